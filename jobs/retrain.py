"""`tokenmill retrain CONFIG [--set k=v ...] [--json PATH]` and `python -m tokenmill.jobs.retrain CONFIG`.

One champion/challenger round (`pipeline.registry.retrain` says what happens). A failed step
leaves the alias where it was and exits 1 with one line naming the step (2 for a user mistake).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from tokenmill.jobs.cli import add_config_options, add_json_option, check_output_setting, check_run_outputs

if TYPE_CHECKING:
    from tokenmill.pipeline.registry.retrain import RetrainResult

EXIT_FAILED = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "retrain", help="train a challenger on the newest data, promote it over the champion if it wins, re-tokenize",
        description="Champion/challenger retraining (configs/retrain_vqvae.yaml on this machine, "
        "configs/retrain_vqvae_cluster.yaml on a cluster). Idempotent per data version; "
        "concurrent runs promote at most once. RAY_ADDRESS / MLFLOW_TRACKING_URI move it to a cluster.",
    )
    add_config_options(parser)
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> RetrainResult:
    from tokenmill.pipeline.registry.config import load_retrain_config
    from tokenmill.pipeline.registry.retrain import StepFailed, retrain

    config = load_retrain_config(args.config, args.overrides)  # exits 2 on a bad config, before Ray
    check_run_outputs(config.run)
    if "://" not in config.retokenize.out_prefix:  # versioned stores: <out_prefix>/<version>/<model>-v<N>
        check_output_setting(config.retokenize.out_prefix, "retokenize.out_prefix", marks=None)
    try:
        return retrain(config)
    except StepFailed as err:
        print(f"tokenmill retrain: error: {err}; the {config.promotion.alias} is unchanged", file=sys.stderr)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"promoted": False, "decision": "failed", "reason": str(err)}, indent=2) + "\n")
        raise SystemExit(EXIT_FAILED) from None


if __name__ == "__main__":
    from tokenmill.jobs.cli import module_main

    sys.exit(module_main("retrain"))
