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
    "tokenmill.jobs.sample",
    "tokenmill.jobs.eval",
    "tokenmill.jobs.bench",
]

EXIT_USER_ERROR = 2


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", type=Path, help="write the result summary as JSON to PATH")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file, or the name of a preset shipped with tokenmill: "
                        "debug_vqvae, vqvae_mnist, prior_mnist, ... (a wrong name lists them all)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.steps=200 (repeatable)",
    )


# argparse `type=` validators: a bad value is refused before any work with argparse's one
# `error: argument --NAME: ...` line (exit 2), which names the option and the value typed.
def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value

    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def output_folder(text: str) -> Path:
    """A local folder the job writes into: it may not exist yet, but must not be a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; expected a folder (it is created if missing)")
    return path


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
