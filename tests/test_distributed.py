"""The whole loop on 2 CPU processes (gloo, torchrun) against 1 process with the same global batch: every task trains
under DDP, the ranks agree exactly, alpha within 1e-6 and the merged weights within 1e-5 relative. (Regression:
Accelerate marked the model prepared after an evaluation, so every task after the first trained without DDP, each
rank on its own shard, and the ranks' models drifted apart.)"""

import pytest
from conftest import checkpoint_tensors, groups, torchrun

from pm_hf.checks import InputError
from pm_hf.continual import ContinualTrainer, run_continual


def test_two_processes_equal_one_with_the_same_global_batch(model_dir, tmp_path):
    rank0, rank1 = torchrun(model_dir, tmp_path / "ddp", 4)
    single = run_continual(*groups(model_dir, tmp_path / "one", per_device_train_batch_size=8))
    assert rank0["alphas"] == rank1["alphas"] and rank0["delta_norms"] == rank1["delta_norms"]  # ranks agree
    assert len(rank0["alphas"]) == 3
    for a, b in zip(rank0["alphas"], single["alphas"]):
        assert abs(a - b) < 1e-6, (rank0["alphas"], single["alphas"])
    two, one = checkpoint_tensors(tmp_path / "ddp" / "run"), checkpoint_tensors(tmp_path / "one")
    assert two.keys() == one.keys()
    for key in one:
        if key.startswith("weights/"):
            scale = one[key].abs().max().clamp_min(1e-12)
            assert float((two[key] - one[key]).abs().max() / scale) < 1e-5, key
    assert rank0["distributed"] == {"type": "MULTI_CPU", "num_processes": 2, "sharding": "none"}
    assert single["distributed"] == {"type": "NO", "num_processes": 1, "sharding": "none"}


@pytest.mark.parametrize(("field", "value"), [("fsdp", "full_shard"), ("deepspeed", "ds_config.json")])
def test_sharded_setups_are_refused_before_anything_loads(model_dir, tmp_path, field, value):
    with pytest.raises(InputError, match=rf"^{field} = .*does not shard models yet"):
        groups(model_dir, tmp_path / "run", **{field: value})  # PMConfig itself refuses
    assert not (tmp_path / "run").exists()


def test_an_accelerate_fsdp_launch_is_refused_not_run_as_ddp(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    with pytest.raises(InputError, match=r"^fsdp = 'accelerate config \(FSDP\)'"):
        ContinualTrainer.from_args(*groups(model_dir, tmp_path / "run"))


def test_a_launch_whose_ranks_would_train_alone_is_refused(model_dir, tmp_path, monkeypatch):
    args = groups(model_dir, tmp_path / "run", use_cpu=False)  # no GPU here: the Trainer sees one process
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets for 2 processes
    with pytest.raises(InputError, match=r"^use_cpu = False: launched with 2 processes but the training .* see 1"):
        ContinualTrainer.from_args(*args)
