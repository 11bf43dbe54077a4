"""The `pm-hf` command: `pm-hf train --config FILE.yaml [--preset NAME] [--resume] [--<field> value ...]` and
`pm-hf evaluate RUN_DIR`. Config problems print `pm-hf: error: <message>` and exit with code 2 before anything is
written (parsing: `pm_hf.parsing`); the end-of-run summary is `pm_hf.results.format_results`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import typing
from collections.abc import Sequence

from .checks import InputError, NonFiniteError, invalid
from .parsing import USAGE, Parser, build_parser, did_you_mean, parse_config
from .results import format_evaluation, format_results
from .trainer import DivergenceError


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _train(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        build_parser(cli_options=True).print_help()
        raise SystemExit(0)
    pre = Parser(None, add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--resume", action="store_true")
    pre.add_argument("--debug", action="store_true")
    known, rest = pre.parse_known_args(argv)
    with _errors(known.debug):
        parsed = parse_config(known.config, rest)
        from .continual import run_continual  # heavy (models, datasets): only once the config is valid

        results = run_continual(*parsed, resume=known.resume)
    if _is_main_process():
        print(format_results(results))
    return 0


@contextlib.contextmanager
def _errors(debug: bool):
    """Bad input: `pm-hf: error: <field> = <value>: <fix>`, exit 2, nothing written. A diverged or non-finite run:
    its message, exit 1, the last checkpoint intact. `--debug` shows the traceback instead; anything else (a bug)
    keeps its traceback."""
    try:
        yield
    except (InputError, NonFiniteError, DivergenceError) as err:
        if debug:
            raise
        _fail(" ".join(str(err).split()), code=2 if isinstance(err, InputError) else 1)


def _evaluate(argv: list[str]) -> int:
    parser = Parser(None, prog="pm-hf evaluate", description="Re-evaluate a saved run on every task.")
    parser.add_argument("run_dir", help="output_dir of a `pm-hf train` run.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    debug = "--debug" in argv
    with _errors(debug):
        run_dir = parser.parse_args(argv).run_dir
        if not os.path.isdir(run_dir):
            raise invalid("run_dir", run_dir, "not found: pass the output_dir of a `pm-hf train` run.")
        from .continual import evaluate_run

        evaluation = evaluate_run(run_dir)
    if _is_main_process():
        print(format_evaluation(evaluation, run_dir))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pm-hf` (and of `scripts/train_continual.py` under `accelerate launch`).

    Returns 0 on success. Config and usage errors print `pm-hf: error: <message>` to stderr and exit with code 2
    (before anything is written); errors during training propagate with their traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": _train, "evaluate": _evaluate}
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
