"""The whole loop on 2 CPU processes (gloo, torchrun) against 1 process with the same global batch: under DDP (tiny
BERT: the ranks agree exactly, alpha within 1e-6, merged weights within 1e-5 relative) and under FSDP2 (tiny Llama,
the state sharded like the weights); what is not supported is refused before anything loads. (Regression: Accelerate
marked the model prepared after an evaluation, so every task after the first trained without DDP, each rank on its
own shard, and the ranks' models drifted apart.)"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_tensors, groups, llm_groups, torchrun, two_domains
from datasets import Dataset
from safetensors.torch import load_file

from pm_hf.config.checks import InputError
from pm_hf.config.groups import MergeArguments, PMConfig
from pm_hf.continual import ContinualTrainer, run_continual
from pm_hf.run.runs import load_run

ROOT = Path(__file__).resolve().parents[1]
ZERO3_ROWS = {"stage": 3, "stage3_param_persistence_threshold": 0}


@pytest.fixture(scope="module")
def one_process_batch_8(model_dir, tmp_path_factory):
    """The 1-process x batch 8 reference run of the DDP / ZeRO-2 equivalences: its results and checkpoint tensors."""
    out = tmp_path_factory.mktemp("one")
    single = run_continual(*groups(model_dir, out, per_device_train_batch_size=8))
    assert single["distributed"] == {"type": "NO", "num_processes": 1, "sharding": "none"}
    return single, checkpoint_tensors(out)


# the default run's one multi-process launch is DDP; every other launch is in the `slow` tier (CI runs it)
@pytest.mark.parametrize(
    ("flags", "setup"),
    [((), ("MULTI_CPU", "none")), pytest.param(("zero2",), ("DEEPSPEED", "zero2"), marks=pytest.mark.slow)],
    ids=["ddp", "zero2"],
)
def test_two_processes_equal_one_with_the_same_global_batch(model_dir, tmp_path, one_process_batch_8, flags, setup):
    """DDP and DeepSpeed ZeRO-2 (2 processes x batch 4) against 1 process x batch 8: the ranks agree exactly, alpha
    within 1e-6, the merged weights within 5e-5 relative (fp32 reduction order over Adam steps: 1.3e-5 measured)."""
    single, one = one_process_batch_8
    rank0, rank1 = torchrun(model_dir, tmp_path / "run_ddp", 4, *flags)
    assert rank0["alphas"] == rank1["alphas"] and rank0["delta_norms"] == rank1["delta_norms"]  # ranks agree
    assert len(rank0["alphas"]) == 3
    for a, b in zip(rank0["alphas"], single["alphas"]):
        assert abs(a - b) < 1e-6, (flags, rank0["alphas"], single["alphas"])
    two = checkpoint_tensors(tmp_path / "run_ddp" / "run")
    assert two.keys() == one.keys()
    for key in one:
        if key.startswith("weights/"):
            scale = one[key].abs().max().clamp_min(1e-12)
            assert float((two[key] - one[key]).abs().max() / scale) < 5e-5, (flags, key)
    assert rank0["distributed"] == {"type": setup[0], "num_processes": 2, "sharding": setup[1]}


ALIGNED = {"head_align": "prototypes", "head_align_drift": "sdc", "class_groups": [[0, 1], [2, 3]]}
SETUPS = {"sharded": ("FSDP", "fsdp2"), "zero3": ("DEEPSPEED", "zero3")}


def one_process(model_dir, out, batch: int, *flags) -> dict:
    """tests/ddp_script.py in one process (the reference of a 2-process run); returns what it recorded."""
    script = ROOT / "tests" / "ddp_script.py"
    done = subprocess.run([sys.executable, str(script), model_dir, str(out), str(batch), *flags],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((Path(out) / "rank0.json").read_text())


def equals_one_process(model_dir, tmp_path, flag: str, *options: str) -> dict:
    """A classifier run on 2 processes x batch 4 with its weights sharded (`flag`) against 1 process x batch 8: the
    same alphas (within 1e-6) and score matrices; task vector norms, merged weights, S, G, the callbacks' state and
    the export within float tolerance (the class head within 1e-3: refitted by 100 Adam steps when aligned); each
    rank holds half of S and G. Returns rank 0's record."""
    rank0, rank1 = torchrun(model_dir, tmp_path / flag, 4, flag, *options)
    single = one_process(model_dir, tmp_path / "one", 8, *options)
    assert rank0 == rank1 and rank0["distributed"] == dict(zip(("type", "num_processes", "sharding"),
                                                               (SETUPS[flag][0], 2, SETUPS[flag][1])))  # fmt: skip
    assert rank0["state_fraction"] == 0.5 and len(rank0["alphas"]) == 2 and 0 < rank0["alphas"][1] < 1
    for a, b in zip(rank0["alphas"], single["alphas"]):
        assert abs(a - b) < 1e-6, (rank0["alphas"], single["alphas"])
    assert rank0["delta_norms"] == pytest.approx(single["delta_norms"], rel=1e-5)
    assert rank0["scores"] == single["scores"]
    runs = (tmp_path / flag / "run", tmp_path / "one" / "run")
    two, one = (checkpoint_tensors(run) for run in runs)
    exported = [load_file(str(run / "merged_adapter" / "adapter_model.safetensors")) for run in runs]
    assert two.keys() == one.keys() and exported[0].keys() == exported[1].keys() and "weights/classifier.weight" in one
    for name, (got, ref) in {"checkpoint": (two, one), "export": exported}.items():
        for key in ref:
            scale = ref[key].abs().max().clamp_min(1e-12)
            tolerance = 1e-3 if "classifier." in key else 1e-4
            assert float((got[key] - ref[key]).abs().max() / scale) < tolerance, (name, key)
    return rank0


@pytest.mark.slow  # two launches per setup (about 80 s)
@pytest.mark.parametrize("flag", SETUPS)
def test_a_classifier_with_sharded_weights_equals_one_process_with_its_head_sharded_and_aligned(
    model_dir, tmp_path, flag
):
    """The tiny BERT with its weights sharded (FSDP2: its layers and its root, i.e. the embeddings, the trained
    pooler and the class head; ZeRO-3: every weight partitioned), built by the Python API from two tasks given up
    front (classes 0 and 7, then 3 and 9: the head grows from 8 to 10 rows before training, partitioned under ZeRO-3,
    and every task trains rows of both ranks), with the prototype head alignment and drift compensation: it equals
    the 1-process run (`equals_one_process`)."""
    align = [f"{k}={v}" for k, v in ALIGNED.items() if k != "class_groups"]
    rank0 = equals_one_process(model_dir, tmp_path, flag, "api", "api_classes=[[0, 7], [3, 9]]", *align)
    assert rank0["scores"]["accuracy"][1][1] is not None


@pytest.mark.slow  # two launches per setup
@pytest.mark.parametrize("flag", SETUPS)
def test_a_domain_incremental_classifier_with_sharded_weights_merges_its_shared_head_as_one_process(
    model_dir, tmp_path, flag
):
    """Two domains of the same 4 classes: the head is merged like any parameter, its rows split among the ranks
    (rows 0-1 on rank 0, 2-3 on rank 1); the run equals the 1-process run (`equals_one_process`). ZeRO-3: `slow`."""
    domains = two_domains(tmp_path)
    equals_one_process(model_dir, tmp_path, flag, "scenario=domain_incremental", f"task_datasets={json.dumps(domains)}")


@pytest.mark.slow  # three 2-process launches per setup (about 40 s each)
@pytest.mark.parametrize("flag", ["sharded", "zero3"])
def test_a_classifier_with_sharded_weights_killed_in_a_task_resumes_as_the_same_run(model_dir, tmp_path, flag):
    """FSDP2 / ZeRO-3, the tiny BERT with the prototype head alignment and drift compensation, checkpointing every
    step: killed at step 3 of task 2 and resumed from its step-2 checkpoint (under ZeRO-3 the resumed run's first
    drift measurement runs before any engine: the weights are gathered for it), the run equals the uninterrupted one."""
    options = [f"{k}={json.dumps(v)}" for k, v in ALIGNED.items()] + ["save_strategy=steps", "save_steps=1"]
    whole = torchrun(model_dir, tmp_path / "whole", 4, flag, *options)[0]
    crashed = torchrun(model_dir, tmp_path / "killed", 4, flag, "crash", "kill_at=3", *options, record="crashed")
    assert crashed[0] == crashed[1] and crashed[0]["checkpoint"].endswith("tasks/task_1/checkpoint-2")
    resumed = torchrun(model_dir, tmp_path / "killed", 4, flag, "continue", *options)[0]
    assert whole.pop("first_steps") == [0, 0] and resumed.pop("first_steps") == [2]
    assert resumed == whole


@pytest.mark.slow  # one 2-process launch
def test_a_nan_on_one_process_stops_every_process_at_the_same_step(model_dir, tmp_path):
    """Process 1 alone gets a NaN loss (step 2 of task 2): both processes stop there with the same error, none left
    waiting in a collective (the run ends well inside the timeout), and the checkpoint holds task 1, intact."""
    stopped = torchrun(model_dir, tmp_path / "nan", 4, "poison", record="diverged", timeout=240)
    assert stopped[0] == stopped[1], stopped
    assert "task 1 at optimizer step 2 on process 1: loss = nan" in stopped[0]["error"]
    assert stopped[0]["completed"] == 1


@pytest.mark.slow  # four 2-process launches
def test_fsdp2_on_two_processes_equals_one_process_and_resumes(llm_dir, tmp_path):
    """FSDP2 (`fully_shard`, Accelerate's FSDP path, run on CPU by `pm_hf.testing.fsdp_on_cpu`) on 2 processes x
    batch 2 against 1 process x batch 4: the same alphas, scores, checkpoint and export within float tolerance; each
    rank holds half of S and G; a run stopped after task 1 and resumed, and one killed in the middle of task 2 and
    resumed from its mid-task checkpoint, are the same run."""
    rank0, rank1 = torchrun(llm_dir, tmp_path / "fsdp", 2, "sharded", script="fsdp_script.py")
    resumed = torchrun(llm_dir, tmp_path / "resumed", 2, "sharded", "resume", script="fsdp_script.py")[0]
    killed = tmp_path / "killed"  # checkpoints every step, killed at step 2 of task 2, resumed
    crashed = torchrun(llm_dir, killed, 2, "sharded", "crash", script="fsdp_script.py", record="crashed")
    assert crashed[0] == crashed[1] and crashed[0]["checkpoint"].endswith("tasks/task_1/checkpoint-1")
    continued = torchrun(llm_dir, killed, 2, "sharded", "continue", script="fsdp_script.py")[0]
    one = llm_groups(llm_dir, tmp_path / "one", per_device_train_batch_size=4, logging_steps=1, save_strategy="no")
    single = ContinualTrainer.from_args(*one).train().results
    assert rank0 == rank1  # the ranks agree on everything they report
    assert rank0["distributed"] == {"type": "FSDP", "num_processes": 2, "sharding": "fsdp2"}
    assert single["distributed"] == {"type": "NO", "num_processes": 1, "sharding": "none"}
    assert rank0["state_fraction"] == 0.5  # S and G sharded like the weights: each rank holds its half
    assert single["alphas"][0] == 1.0 and 0.0 < single["alphas"][1] < 1.0
    for a, b in zip(rank0["alphas"] + rank0["delta_norms"], single["alphas"] + single["delta_norms"]):
        assert abs(a - b) < 1e-6, (rank0["alphas"], single["alphas"])
    for row, ref in zip(rank0["scores"]["eval_loss"], single["score_matrices"]["eval_loss"]):
        assert [x if x is None else pytest.approx(x, rel=1e-5) for x in ref] == row
    assert rank0.pop("first_steps") == [0, 0] and resumed.pop("first_steps") == [0]
    assert resumed == rank0  # stopped after task 1, resumed: the same run, bit for bit
    assert continued.pop("first_steps") == [1]  # task 2 continued from its mid-task checkpoint (step 1)
    assert continued == rank0  # killed in the middle of task 2, resumed: the same run, bit for bit
    two, ref = checkpoint_tensors(tmp_path / "fsdp" / "run"), checkpoint_tensors(tmp_path / "one")
    assert two.keys() == ref.keys() and any(k.startswith("strategy/S/") for k in ref)
    for key in ref:
        scale = ref[key].abs().max().clamp_min(1e-12)
        assert float((two[key] - ref[key]).abs().max() / scale) < 1e-5, key
    exported = [
        load_file(str(p / "merged_adapter" / "adapter_model.safetensors"))
        for p in (tmp_path / "fsdp" / "run", tmp_path / "one")
    ]
    assert exported[0].keys() == exported[1].keys()
    for key, value in exported[1].items():
        assert torch.allclose(exported[0][key], value, rtol=1e-4, atol=1e-6), key


@pytest.mark.slow  # aborted once at process exit on a fresh clone (SIGABRT, "terminate called without an active
# exception"), passing here; kept out of the default run until that is understood
def test_zero2_llm_killed_late_in_a_task_resumes_as_the_same_run_and_leaves_no_engine_behind(llm_dir, tmp_path):
    """DeepSpeed ZeRO-2 (`pm_hf.testing.deepspeed_on_cpu`) on 2 processes x batch 1, 6 steps per task, with the
    `branch` calibration (alpha from the late-epoch branch losses of every process): killed at step 5 of task 2 and
    resumed from DeepSpeed's step-4 checkpoint, the run equals the uninterrupted one bit for bit (branch counts and
    each process's late losses come back too); each task's engine is gone after its task (no forward hooks left on
    the model, no optimizer alive). ZeRO-2 against 1 process: `test_two_processes_equal_one_with_the_same_global_batch`.
    """
    opts = ("zero2", "alpha_calibration=branch")
    whole = torchrun(llm_dir, tmp_path / "whole", 1, *opts, script="fsdp_script.py")[0]
    killed = tmp_path / "killed"
    crashed = torchrun(llm_dir, killed, 1, *opts, "crash", "kill_at=5", script="fsdp_script.py", record="crashed")
    assert crashed[0] == crashed[1] and crashed[0]["checkpoint"].endswith("tasks/task_1/checkpoint-4")
    assert (Path(crashed[0]["checkpoint"]) / "global_step4").is_dir()  # DeepSpeed's own checkpoint of the engine
    rank0, rank1 = torchrun(llm_dir, killed, 1, *opts, "continue", script="fsdp_script.py")
    assert rank0 == rank1 and rank0.pop("first_steps") == [4]  # task 2 continued from its mid-task checkpoint
    assert whole.pop("first_steps") == [0, 0]
    assert rank0 == whole  # the same run, bit for bit
    assert whole["branch_losses"][1]["-1"] is not None and 0.0 < whole["alphas"][1] < 1.0
    assert whole["distributed"] == {"type": "DEEPSPEED", "num_processes": 2, "sharding": "zero2"}
    assert whole["state_fraction"] == 1.0  # ZeRO-2 keeps the weights whole, and pm_hf's state beside them
    assert whole["forward_hooks"] == 0 and whole["live_optimizers"] == 0


@pytest.mark.slow  # one 2-process launch and a 1-process run
def test_zero3_on_two_processes_equals_one_process_with_the_state_divided(llm_dir, tmp_path):
    """DeepSpeed ZeRO-3 (`pm_hf.testing.deepspeed_on_cpu`; the weights partitioned as they load, each rank's
    partition read as its rows by `pm_hf.distributed.zero3`) on 2 processes x batch 1 against 1 process x batch 2:
    the same
    alphas, scores, checkpoint and export within float tolerance, each rank holding half of S and G; no optimizer or
    hook is left behind; the saved run, reloaded by one process, scores the same."""
    rank0, rank1 = torchrun(llm_dir, tmp_path / "zero3", 1, "zero3", script="fsdp_script.py")
    one = llm_groups(llm_dir, tmp_path / "one", per_device_train_batch_size=2, logging_steps=1, save_strategy="no")
    single = ContinualTrainer.from_args(*one).train().results
    assert rank0 == rank1
    assert rank0["distributed"] == {"type": "DEEPSPEED", "num_processes": 2, "sharding": "zero3"}
    assert rank0["state_fraction"] == 0.5  # S and G beside each rank's partition: half each
    assert rank0["live_optimizers"] == 0 and rank0["hooks_left"] == 0
    assert 0.0 < single["alphas"][1] < 1.0
    for a, b in zip(rank0["alphas"] + rank0["delta_norms"], single["alphas"] + single["delta_norms"]):
        assert abs(a - b) < 1e-6, (rank0["alphas"], single["alphas"])
    for row, ref in zip(rank0["scores"]["eval_loss"], single["score_matrices"]["eval_loss"]):
        assert [x if x is None else pytest.approx(x, rel=1e-5) for x in ref] == row
    two, ref = checkpoint_tensors(tmp_path / "zero3" / "run"), checkpoint_tensors(tmp_path / "one")
    assert two.keys() == ref.keys() and any(k.startswith("strategy/S/") for k in ref)
    for key in ref:
        scale = ref[key].abs().max().clamp_min(1e-12)
        assert float((two[key] - ref[key]).abs().max() / scale) < 1e-5, key
    again = load_run(tmp_path / "zero3" / "run")  # the saved ZeRO-3 run, reloaded by this one process, whole
    assert again.evaluator.evaluate_seen(again.stream.tasks)["eval_loss"] == rank0["scores"]["eval_loss"][-1]
    exported = [load_file(str(p / "merged_adapter" / "adapter_model.safetensors"))
                for p in (tmp_path / "zero3" / "run", tmp_path / "one")]  # fmt: skip
    assert exported[0].keys() == exported[1].keys()
    for key, value in exported[1].items():
        assert torch.allclose(exported[0][key], value, rtol=1e-4, atol=1e-6), key


@pytest.mark.slow  # three 2-process launches (about 50 s)
def test_zero3_killed_in_the_middle_of_a_task_resumes_as_the_same_run(llm_dir, tmp_path):
    """ZeRO-3 on 2 processes x batch 1, killed at step 5 of task 2's 6 and resumed from DeepSpeed's step-4
    checkpoint (its partitioned optimizer state): bit for bit the uninterrupted run."""
    whole = torchrun(llm_dir, tmp_path / "whole", 1, "zero3", script="fsdp_script.py")[0]
    killed = tmp_path / "killed"
    crashed = torchrun(llm_dir, killed, 1, "zero3", "crash", "kill_at=5", script="fsdp_script.py", record="crashed")
    assert crashed[0] == crashed[1] and crashed[0]["checkpoint"].endswith("tasks/task_1/checkpoint-4")
    assert (Path(crashed[0]["checkpoint"]) / "global_step4").is_dir()  # DeepSpeed's own checkpoint
    continued = torchrun(llm_dir, killed, 1, "zero3", "continue", script="fsdp_script.py")
    assert continued[0] == continued[1]
    assert whole.pop("first_steps") == [0, 0] and continued[0].pop("first_steps") == [4]
    assert continued[0] == whole  # killed in the middle of task 2, resumed: the same run, bit for bit


@pytest.mark.slow  # two 2-process launches
def test_fsdp2_in_bf16_equals_ddp_in_bf16_with_the_fp32_master_sharded(llm_dir, tmp_path):
    """A bf16 model: FSDP2 and DDP on the same 2 processes agree (against 1 process they both differ at bf16 precision:
    the batch is split), and under FSDP2 each rank holds half of S, G and the fp32 master copy."""
    fsdp = torchrun(llm_dir, tmp_path / "fsdp", 2, "sharded", "dtype=bfloat16", script="fsdp_script.py")[0]
    ddp = torchrun(llm_dir, tmp_path / "ddp", 2, "dtype=bfloat16", script="fsdp_script.py")[0]
    assert fsdp["state_fraction"] == 0.5 and ddp["state_fraction"] == 1.0
    assert ddp["distributed"]["type"] == "MULTI_CPU" and fsdp["distributed"]["sharding"] == "fsdp2"
    for a, b in zip(fsdp["alphas"] + fsdp["delta_norms"], ddp["alphas"] + ddp["delta_norms"]):
        assert abs(a - b) < 1e-9
    assert fsdp["scores"] == ddp["scores"]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"deepspeed": "missing.json"}, r"^deepspeed = 'missing.json': not a readable DeepSpeed JSON config"),
        (
            {"deepspeed": {"zero_optimization": {"stage": 3}}},
            r"^deepspeed = 'deepspeed config \(stage3_param_persistence_threshold None\)': set .* to 0",
        ),
        (
            {"deepspeed": {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}},
            r"^deepspeed = 'deepspeed config \(optimizer\)': remove the `optimizer` section",
        ),
        (
            {"deepspeed": {"zero_optimization": {**ZERO3_ROWS, "offload_param": {"device": "cpu"}}}},
            r"^deepspeed = 'deepspeed config \(offload_param.device cpu\)': pm_hf writes merges into each rank's",
        ),
        (
            {"deepspeed": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}},
            r"^deepspeed = 'deepspeed config \(bf16.enabled\)': DeepSpeed's mixed precision casts the whole model",
        ),
        ({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, r"^fsdp_config = .*FSDP2 only"),
    ],
)
def test_deepspeed_and_fsdp1_configs_pm_hf_cannot_run_are_refused_by_the_arguments(model_dir, tmp_path, kw, match):
    with pytest.raises(InputError, match=match):
        groups(model_dir, tmp_path / "run", **kw)  # PMConfig itself refuses
    assert not (tmp_path / "run").exists()


def test_deepspeed_where_accelerate_would_run_ddp_or_zero3_pm_hf_cannot_run_is_refused_before_anything_loads(
    model_dir, tmp_path, monkeypatch
):
    args = groups(model_dir, tmp_path / "run", deepspeed={"zero_optimization": {"stage": 2}})  # on CPU: plain DDP
    with pytest.raises(InputError, match=r"^deepspeed = 'DeepSpeed config': Accelerate runs DeepSpeed on GPUs only"):
        ContinualTrainer.from_args(*args)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` with a ZeRO-3 config sets
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(InputError, match=r"^deepspeed = 'accelerate config \(stage3_param_persistence_threshold"):
        ContinualTrainer.from_args(*groups(model_dir, tmp_path / "run"))  # a parameter kept whole: merges unread
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ROOT / "configs" / "deepspeed" / "zero3.json"))
    with pytest.raises(InputError, match=r"^deepspeed = 'DeepSpeed config': Accelerate runs DeepSpeed on GPUs only"):
        ContinualTrainer.from_args(*groups(model_dir, tmp_path / "run"))  # configs/accelerate/zero3.yaml passes
    monkeypatch.setattr("pm_hf.distributed.launch.accelerate_runs_on", lambda args, kind: True)  # as on GPUs
    with pytest.raises(InputError, match=r"^merge_method = 'ties': is not available on sharded weights"):
        ContinualTrainer.from_args(*groups(model_dir, tmp_path / "run", merge_method="ties"))
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # `accelerate launch`'s mixed_precision: bf16
    with pytest.raises(InputError, match=r"^mixed_precision = 'bf16': in the accelerate config, with DeepSpeed"):
        ContinualTrainer.from_args(*groups(model_dir, tmp_path / "run"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    with pytest.raises(InputError, match=r"^bf16 = True: with DeepSpeed: DeepSpeed's mixed precision"):
        ContinualTrainer.from_args(*groups(model_dir, tmp_path / "run", bf16=True))
    assert not (tmp_path / "run").exists()


def test_fsdp_where_accelerate_would_run_ddp_is_refused_before_anything_loads(model_dir, tmp_path, monkeypatch):
    args = groups(model_dir, tmp_path / "run", fsdp="full_shard")  # on CPU: Accelerate would run plain DDP
    with pytest.raises(InputError, match=r"^fsdp = .*would run this as plain DDP on CPU"):
        ContinualTrainer.from_args(*args)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(InputError, match=r"^fsdp = 'accelerate config \(FSDP\)': pm_hf shards with FSDP2 only"):
        ContinualTrainer.from_args(*groups(model_dir, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("which", "kw", "match"),
    [
        ("llm", {"merge_method": "ties"}, r"^merge_method = 'ties': is not available on sharded weights"),
        (
            "llm",
            {"accumulator_device": "cpu"},
            r"^accumulator_device = 'cpu': with sharded weights the continual state is sharded",
        ),
        ("bert", {"merge_method": "oracle-alpha"}, r"^merge_method = 'oracle-alpha': is not available on sharded"),
        (
            "llm",
            {"save_strategy": "steps", "fsdp_config": {"version": 2}},
            r"^fsdp_config = 'FULL_STATE_DICT': mid-task checkpoints .* sharded state",
        ),
    ],
)
def test_what_fsdp2_does_not_support_is_refused_before_loading(
    model_dir, llm_dir, tmp_path, monkeypatch, which, kw, match
):
    monkeypatch.setattr("pm_hf.distributed.launch.accelerate_runs_on", lambda args, kind: True)  # as on GPUs
    fsdp = {"fsdp": "full_shard", "fsdp_config": {"version": 2, "state_dict_type": "SHARDED_STATE_DICT"}}
    make = groups if which == "bert" else llm_groups
    lora = {"modules_to_save": kw.pop("modules_to_save")} if "modules_to_save" in kw else {}
    args = make(model_dir if which == "bert" else llm_dir, tmp_path / "run", **{**fsdp, **kw})
    args = (*args[:3], dataclasses.replace(args[3], **lora), *args[4:])
    with pytest.raises(InputError, match=match):
        ContinualTrainer.from_args(*args)
    assert not (tmp_path / "run").exists()


def test_the_python_api_refuses_what_fsdp2_does_not_support(llm_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("pm_hf.distributed.launch.accelerate_runs_on", lambda args, kind: True)  # as on GPUs
    rows = [{"prompt": f"word {i}", "response": f"answer {i % 7}"} for i in range(8)]
    task = {"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:4])}
    fsdp = {"fsdp": "full_shard", "fsdp_config": {"version": 2, "state_dict_type": "SHARDED_STATE_DICT"}}
    args = PMConfig(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", **fsdp)
    trainer = ContinualTrainer(llm_dir, args, tasks=[task], merge_args=MergeArguments(merge_method="ties"))
    with pytest.raises(InputError, match=r"^merge_args\.merge_method = 'ties': is not available on sharded"):
        trainer.train()
    assert not (tmp_path / "run").exists()


def test_a_launch_whose_ranks_would_train_alone_is_refused(model_dir, tmp_path, monkeypatch):
    args = groups(model_dir, tmp_path / "run", use_cpu=False)  # no GPU here: the Trainer sees one process
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets for 2 processes
    with pytest.raises(InputError, match=r"^use_cpu = False: launched with 2 processes but the training .* see 1"):
        ContinualTrainer.from_args(*args)
