"""`tokenmill train CONFIG [--set k=v ...]` and `python -m tokenmill.jobs.train CONFIG` (for `ray job submit`).

Driver side of training: validate the config and the data before Ray starts, create (or
find, when resuming) the MLflow run, start Ray Train's TorchTrainer over the streamed shards,
then export the final model (config.json + safetensors) and register it in MLflow.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from tokenmill.jobs.cli import add_config_options, add_json_option, check_run_outputs, train_refused_cleanly

if TYPE_CHECKING:
    from tokenmill.pipeline.training.driver import TrainSummary


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model with Ray Train DDP on sharded data, tracked in MLflow",
        description="Train any model of the VAE or VQ family (configs/*.yaml). Rerunning with the same "
        "run.name resumes from the latest checkpoint. RAY_ADDRESS / MLFLOW_TRACKING_URI move it to a cluster.",
    )
    add_config_options(parser)
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> TrainSummary:
    from tokenmill.pipeline.training.config import load_train_config
    from tokenmill.pipeline.training.driver import train

    config = load_train_config(args.config, args.overrides)  # exits 2 on a bad config, before Ray
    check_run_outputs(config.run)
    with train_refused_cleanly(config.run):
        summary = train(config)
    _print_summary(summary)
    return summary


def _print_summary(summary: TrainSummary) -> None:
    metrics = {k: v for k, v in summary.final_metrics.items() if k.startswith("val/")}
    shown = "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    print(f"trained {summary.run_name}: step {summary.final_metrics['step']}  {shown}")
    print(f"  model     {summary.model_dir}  ({summary.model_uri})")
    print(f"  mlflow    {summary.mlflow_tracking_uri}  run {summary.mlflow_run_id}")
    print(f"  checkpoint {summary.checkpoint}")


if __name__ == "__main__":
    from tokenmill.jobs.cli import module_main

    sys.exit(module_main("train"))
