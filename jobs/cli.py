"""The `tokenmill` command line.

Each subcommand lives in its own module with a `register(subparsers)` function that adds its
parser and sets `run=handler`; heavy imports (torch, ray) happen inside handlers so `--help`
stays fast. A handler returns its summary (a dict, or a dataclass with `to_json()`), written to
`--json PATH` if given.
A `UserError` is printed as one line and exits 2; no traceback. `--verbose` lets Ray's and
MLflow's own log lines through (`pipeline.runtime.console`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

# Order here is the order in `tokenmill --help`.
COMMAND_MODULES = [
    "tokenmill.jobs.demo",
    "tokenmill.jobs.shard",
    "tokenmill.jobs.inspect",
    "tokenmill.jobs.train",
    "tokenmill.jobs.tokenize",
    "tokenmill.jobs.train_prior",
    "tokenmill.jobs.retrain",
    "tokenmill.jobs.decode",
    "tokenmill.jobs.export",
    "tokenmill.jobs.convert",
    "tokenmill.jobs.sample",
    "tokenmill.jobs.eval",
    "tokenmill.jobs.fid_stats",
    "tokenmill.jobs.bench",
]

EXIT_USER_ERROR = 2


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", type=output_path(folder=False), help="write the result summary as JSON to PATH")


def add_inception_options(parser: argparse.ArgumentParser) -> None:
    """--inception / --inception-sha256, shared by fid-stats, eval and sample."""
    parser.add_argument("--inception", default=None, metavar="PATH_OR_URL",
                        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: the torch hub cache)")
    parser.add_argument("--inception-sha256", default=None, metavar="HEX",
                        help="accept Inception weights with this sha256 (or prefix) instead of the published file's")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file, or the name of a preset shipped with tokenmill: "
                        "debug_vqvae, vqvae_mnist, prior_mnist, ... (a wrong name lists them all)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.steps=200 (repeatable)",
    )


# argparse `type=` validators: a bad value is refused before any work with argparse's one
# `error: argument --NAME: ...` line (exit 2), which names the option, the value typed and the
# valid range. Every numeric option of every command uses one of these.
def number_in(kind: type = float, low: float | None = None, high: float | None = None, *,
              low_open: bool = False, high_open: bool = False) -> Callable[[str], Any]:
    """Parses an int (`kind=int`) or a finite float and refuses it outside [low, high] (an open
    end with `low_open` / `high_open`; None: unbounded)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            raise argparse.ArgumentTypeError(f"must be {_range_text(low, high, low_open, high_open)}, got {text}")
        return value

    return parse


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def int_at_least(low: int) -> Callable[[str], int]:
    return number_in(int, low)


positive_int = int_at_least(1)  # counts, sizes, steps, workers
nonnegative_int = int_at_least(0)  # class ids, warm-up steps, "0: skip"
positive_float = number_in(float, 0, low_open=True)  # temperatures, learning rates, seconds
nonnegative_float = number_in(float, 0)  # guidance scales (0: unconditional, 1: none), weights
probability = number_in(float, 0, 1, low_open=True)  # (0, 1]: top-p
fraction = number_in(float, 0, 1, high_open=True)  # [0, 1): dropout, a split's share of keys


def output_path(*, folder: bool = True, marks: tuple[str, ...] | None = (),
                convert: Callable[[str], Any] = Path) -> Callable[[str], Any]:
    """argparse `type=` for a local path or URL the command writes (a folder, or a file with
    `folder=False`): `pipeline.runtime.outputs.check_output` refuses a parent that is a file, no
    write permission, or a non-empty folder holding none of `marks` (the command's own outputs)."""
    def parse(text: str) -> Any:
        from tokenmill.pipeline.runtime.outputs import OutputError, check_output

        try:
            check_output(text, folder=folder, marks=marks)
        except OutputError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return convert(text)

    return parse


def check_output_setting(url: str, setting: str, **kwargs: Any) -> None:
    """`check_output` for an output named by a config key (run.root) or an option checked after
    parsing (it needs --storage-options): a UserError (exit 2) naming `setting`."""
    from tokenmill.models.errors import UserError
    from tokenmill.pipeline.runtime.outputs import OutputError, check_output

    try:
        check_output(url, **kwargs)
    except OutputError as err:
        raise UserError(f"{setting}: {err}") from None


def check_run_outputs(run: Any) -> None:
    """A training run's outputs (its config's `run` section), before Ray starts: `run.root` (a
    folder shared by many runs and anything else) is writable, the run's own folder in it is new
    or a run folder (RUN_DIR_MARKS), and a local `run.storage_path` (checkpoints) is writable."""
    from tokenmill.pipeline.runtime.outputs import RUN_DIR_MARKS

    check_output_setting(run.root, "run.root", marks=None)
    check_output_setting(str(run.run_dir()), "run.root/run.name", marks=RUN_DIR_MARKS)
    if run.storage_path and "://" not in run.storage_path:
        check_output_setting(run.storage_path, "run.storage_path", marks=None)


def train_refused_cleanly(run: Any):
    """Around a training driver: the run's folder, created here, is removed again (with any parent
    created for it) when the driver refuses the job (a UserError) before writing a file into it."""
    from tokenmill.pipeline.runtime.outputs import removed_if_refused

    return removed_if_refused(run.run_dir())


# A scratch folder the command owns wholly (its content is not checked): benchmarks' --workdir.
output_folder = output_path(marks=None)


def json_object(text: str) -> dict[str, Any]:
    """`--storage-options JSON`: a JSON object (fsspec keyword arguments)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"anon\": true}}', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenmill",
        description="Train image tokenizers (VAE family, VQ-VAE) on Ray and tokenize datasets into Zarr.",
    )
    add_verbose_option(parser, default=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for subparser in set(subparsers.choices.values()):  # `tokenmill train --verbose …` works too
        add_verbose_option(subparser, default=argparse.SUPPRESS)
    return parser


def add_verbose_option(parser: argparse.ArgumentParser, default: Any) -> None:
    # SUPPRESS on subcommands: a subcommand without the flag keeps what the top level parsed.
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="show Ray's and MLflow's own log lines too (also TOKENMILL_VERBOSE=1)")


def run_handler(handler: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    from tokenmill.models.errors import UserError  # imports torch (models/__init__): not for --help or a bad argument

    try:
        result = handler(args)
    except UserError as err:
        print(f"tokenmill {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"tokenmill {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if getattr(args, "json", None):
        args.json.parent.mkdir(parents=True, exist_ok=True)
        from tokenmill.pipeline.runtime.redaction import redact

        plain = redact(result.to_json() if hasattr(result, "to_json") else result)
        args.json.write_text(json.dumps(plain, indent=2, sort_keys=True, default=str) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    from tokenmill.pipeline.runtime import console, faults

    args = build_parser().parse_args(argv)
    console.set_verbose(args.verbose)
    console.configure()
    faults.install_from_env()  # tests: TOKENMILL_STORAGE_FAULTS makes this process's s3:// writes fail
    return run_handler(args.run, args)


def module_main(command: str) -> int:
    """`python -m tokenmill.jobs.<command> ARGS` (what `ray job submit` runs) is `tokenmill <command> ARGS`."""
    return main([command, *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
