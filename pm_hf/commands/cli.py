"""The `pm-hf` command: `pm-hf train --config FILE.yaml [--preset NAME] [--resume] [--<field> value ...]`,
`pm-hf check FILE.yaml [--<field> value ...]` (train's checks and its plan; no model loaded, nothing written),
`pm-hf evaluate RUN_DIR | EXPORT --config DATA.yaml`, `pm-hf export RUN_DIR --mode ... --output DIR`,
`pm-hf push RUN_DIR --hub_model_id USER/NAME` and `pm-hf merge --adapters A B ... --output DIR`. Config problems
print `pm-hf: error: <message>` and exit with code 2 before anything is written (parsing: `pm_hf.commands.parsing`); the
end-of-run summary is `pm_hf.run.results.format_results`.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import shutil
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from ..errors import DivergenceError, InputError, MissingExtraError, NonFiniteError, invalid
from ..run.inputs import (
    as_run_dir,
    branch,
    destination,
    export_mode,
    export_target,
    holds_checkpoint,
    no_new_folders,
    repo_id,
    run_folder,
)
from .usage import CHECK_HELP, USAGE, ArgParser, did_you_mean

# Only the stdlib and pm_hf's light modules at import: torch, transformers, peft, datasets and accelerate load inside
# a command once its arguments are read, so `pm-hf --help` and every subcommand's `--help` answer at once.


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


HELP_CACHE = Path("~/.cache/pm_hf/help")


def _help_key() -> str:
    """What the `train` help depends on: pm_hf's sources (the argument dataclasses, presets), the installed
    transformers (TrainingArguments' fields), this interpreter and the terminal width (argparse wraps to it)."""
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    try:
        digest.update(version("transformers").encode())
    except PackageNotFoundError:
        pass
    digest.update(f"{sys.version}|{sys.prefix}|{shutil.get_terminal_size().columns}".encode())
    for path in sorted(Path(__file__).resolve().parents[1].rglob("*.py")):  # the whole package
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def train_help(cache: Path = HELP_CACHE) -> str:
    """The text of `pm-hf train --help`. Its ~200 fields come from `TrainingArguments`, whose import takes seconds, so
    the text is kept in `cache` (default ~/.cache/pm_hf/help) under a key of everything it depends on: the first call
    builds it, later ones read it without importing torch or transformers (an unwritable cache costs the rebuild)."""
    try:
        path = cache.expanduser() / f"train-{_help_key()}.txt"
    except RuntimeError:  # no home folder
        path = None
    if path is not None and path.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError):
            return path.read_text(encoding="utf-8")
    from .parsing import build_parser

    text = build_parser(cli_options=True).format_help()
    if path is not None:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
            for old in path.parent.glob("train-*.txt"):  # the texts of older sources or versions
                if old != path:
                    old.unlink(missing_ok=True)
    return text


def _config_flags(argv: list[str]):
    """`--config`, `--resume` and `--debug` of `train` and `check`; the rest are the config's field flags."""
    pre = ArgParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--resume", action="store_true")
    pre.add_argument("--debug", action="store_true")
    return pre.parse_known_args(argv)


def _train(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(train_help(), end="")
        raise SystemExit(0)
    known, rest = _config_flags(argv)
    with _errors(known.debug):
        from .parsing import parse_config

        parsed = parse_config(known.config, rest)
        from ..continual import run_continual  # heavy (models, datasets): only once the config is valid

        results = run_continual(*parsed, resume=known.resume)
    if _is_main_process():
        from ..run.results import format_results

        print(format_results(results))
    _end_processes()
    return 0


def _check(argv: list[str]) -> int:
    """`pm-hf check CONFIG [--<field> value ...]`: train's validation, data included, without loading weights or
    writing anything; prints what the run would do (`pm_hf.commands.preflight`)."""
    if "-h" in argv or "--help" in argv:
        print(CHECK_HELP, end="")
        raise SystemExit(0)
    known, rest = _config_flags(argv)
    with _errors(known.debug):
        if known.config is None and rest and not rest[0].startswith("-"):
            known.config, rest = rest[0], rest[1:]
        if known.config is None:
            raise invalid("config", None, "give the YAML config to check: `pm-hf check CONFIG [--<field> value ...]`.")
        from .preflight import check_config, format_plan

        plan = check_config(known.config, rest, resume=known.resume)
    print(format_plan(plan))
    return 0


def _end_processes() -> None:
    """Under `accelerate launch` / `torchrun`: every process waits for the others, then the process group is taken
    down before the interpreter exits (left to exit, its threads can abort the process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()  # FSDP2's modules freed before the interpreter's exit, where their teardown could abort it


@contextlib.contextmanager
def _errors(debug: bool):
    """Bad input: `pm-hf: error: <field> = <value>: <fix>`, exit 2, nothing written. A diverged or non-finite run:
    its message, exit 1, the last checkpoint intact; so is a missing optional extra (`pip install 'pm_hf[...]'`).
    `--debug` shows the traceback instead; anything else (a bug) keeps its traceback."""
    try:
        yield
    except (InputError, NonFiniteError, DivergenceError, MissingExtraError) as err:
        if debug:
            raise
        _fail(" ".join(str(err).split()), code=2 if isinstance(err, InputError) else 1)


def _evaluate(argv: list[str]) -> int:
    parser = ArgParser(prog="pm-hf evaluate", description="Score a saved run, an export folder or a Hub model.")
    parser.add_argument("source", help="a run's output_dir, or an export folder / Hub model id (with --config)")
    parser.add_argument("--config", default=None, help="the data config (YAML) to score an export or Hub model on")
    parser.add_argument("--revision", default=None, help="the Hub revision (branch, tag such as task-3, or commit)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    with _errors("--debug" in argv):
        known, rest = parser.parse_known_args(argv)
        if known.revision is not None and Path(known.source).exists():
            fix = "a revision is a Hub model's branch, tag or commit: drop --revision for a local folder."
            raise invalid("revision", known.revision, fix)
        if known.config is not None and holds_checkpoint(known.source):
            fix = (
                f"{known.source!r} is a run folder: evaluate it without --config (on its own data), or export it first."
            )
            raise invalid("config", known.config, fix)
        if known.config is None:
            if rest:
                raise invalid("options", rest, "only --config (with an export or Hub model) takes data options.")
            if not Path(known.source).is_dir():
                what = "is a file" if Path(known.source).exists() else "not found"
                fix = f"{what}: pass the output_dir of a `pm-hf train` run (an export or Hub model needs --config)."
                raise invalid("run_dir", known.source, fix)
            from ..run.runs import evaluate_run

            run_folder(known.source)
            with as_run_dir():
                evaluation = evaluate_run(known.source)
        else:
            from .parsing import parse_config

            overrides = [*rest, "--model_name_or_path", known.source, "--output_dir", "pm-hf-evaluate"]
            parsed = parse_config(known.config, overrides)
            from ..run.runs import evaluate_export

            evaluation = evaluate_export(known.source, parsed, known.revision)
    if _is_main_process():
        from ..run.results import format_evaluation

        print(format_evaluation(evaluation, known.source))
    return 0


def _export(argv: list[str]) -> int:
    parser = ArgParser(prog="pm-hf export", description="Write a run's merged model as a self-describing folder.")
    parser.add_argument("run_dir", help="output_dir of a `pm-hf train` run")
    parser.add_argument("--mode", default="adapter", help="adapter (exact), adapter-svd, merged or per-task")
    parser.add_argument("--rank", type=int, default=None, help="the rank kept by --mode adapter-svd")
    parser.add_argument("--output", required=True, help="the folder to write")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    with _errors("--debug" in argv):
        args = parser.parse_args(argv)
        from ..run.runs import export_run_dir

        export_mode(args.mode, args.rank)
        run_folder(args.run_dir)
        export_target(args.run_dir, args.output)
        with as_run_dir(), no_new_folders(args.output):
            info = export_run_dir(args.run_dir, args.output, args.mode, args.rank)
    if _is_main_process():
        from ..run.results import format_export

        print(format_export(info, args.output))
    return 0


def _push(argv: list[str]) -> int:
    parser = ArgParser(prog="pm-hf push", description="Push a finished run's merged adapter and card to the Hub.")
    parser.add_argument("run_dir", help="output_dir of a `pm-hf train` run")
    parser.add_argument("--hub_model_id", required=True, help="USER/NAME of the model repository")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default=None, help="push to this branch (created if needed)")
    parser.add_argument("--hub_token", default=None, help="a token (default: the logged-in one)")
    parser.add_argument("--push_continual_state", action="store_true", help="push the state to continue from")
    parser.add_argument("--overwrite_hub_state", action="store_true", help="replace another sequence's continual state")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    with _errors("--debug" in argv):
        args = parser.parse_args(argv)
        from ..run.runs import push_run_dir

        repo_id(args.hub_model_id)  # before the Hub is asked anything: it would create the repository
        branch(args.revision)
        run_folder(args.run_dir)
        with as_run_dir():
            oid = push_run_dir(args.run_dir, args.hub_model_id, args.private or None, args.revision, args.hub_token,
                               args.push_continual_state, overwrite_hub_state=args.overwrite_hub_state)  # fmt: skip
    if _is_main_process():
        print(f"Pushed {args.run_dir} to https://huggingface.co/{args.hub_model_id} (commit {oid[:10]})")
    return 0


def _merge(argv: list[str]) -> int:
    from ..hub.card_text import HEAD_RULE

    epilog = (
        f"Without --config, {HEAD_RULE}. Adapters made by plain PEFT (`get_peft_model(...).save_pretrained`) merge."
    )
    parser = ArgParser(
        prog="pm-hf merge", description="Merge trained LoRA adapters of one base, in order.", epilog=epilog
    )
    parser.add_argument("--adapters", nargs="+", required=True, help="adapter folders or Hub ids, in task order")
    parser.add_argument("--output", required=True, help="the export folder to write")
    parser.add_argument("--merge_method", default=None, help="the merge strategy (default: the config's, else pm)")
    parser.add_argument("--config", default=None, help="a data config with one task per adapter (for the Fisher)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    with _errors("--debug" in argv):
        known, rest = parser.parse_known_args(argv)
        from ..run.posthoc import merge_adapters
        from .parsing import parse_config

        extra = [] if known.merge_method is None else ["--merge_method", known.merge_method]
        if known.config is not None:  # its output_dir is not used (the loop runs in a temporary folder): not required
            parsed = parse_config(known.config, [*rest, *extra, "--output_dir", "pm-hf-merge"])
        else:
            placeholders = ["--output_dir", "pm-hf-merge", "--model_name_or_path", "from-the-adapters"]
            merge_args = parse_config(None, [*rest, *extra, *placeholders])[5]
        destination(known.output)
        with no_new_folders(known.output):  # a merge refused after it made the output's parent leaves none
            if known.config is not None:
                info = merge_adapters(known.adapters, known.output, parsed=parsed)
            else:
                info = merge_adapters(known.adapters, known.output, merge_args)
    if _is_main_process():
        from ..run.results import format_export

        print(format_export(info, known.output))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pm-hf` (and of `scripts/train_continual.py` under `accelerate launch`).

    Returns 0 on success. Config and usage errors print `pm-hf: error: <message>` to stderr and exit with code 2
    (before anything is written); errors during training propagate with their traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": _train, "check": _check, "evaluate": _evaluate, "export": _export, "push": _push}
    commands["merge"] = _merge
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr, end="")
        raise SystemExit(0 if argv else 2)
    if argv[0] not in commands:
        _fail(f"command = {argv[0]!r}: unknown{did_you_mean(argv[0], list(commands))}; use one of {list(commands)}.")
    return commands[argv[0]](argv[1:])


def _fail(message: str, code: int = 2) -> typing.NoReturn:
    print(f"pm-hf: error: {message}", file=sys.stderr)
    raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(main())
