"""`tokenmill train-prior CONFIG [--set k=v ...]` and `python -m tokenmill.jobs.train_prior CONFIG`.

Train a Transformer prior over a token store's codes with Ray Train DDP, tracked in MLflow
(the training engine's prior task: pipeline/training/tasks/prior.py).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from tokenmill.jobs.cli import (
    add_config_options,
    add_json_option,
    check_output_setting,
    check_run_outputs,
    train_refused_cleanly,
)

if TYPE_CHECKING:
    from tokenmill.pipeline.training.driver import TrainSummary


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-prior", help="train a Transformer prior on a token store with Ray Train DDP, tracked in MLflow",
        description="Train an autoregressive Transformer over the codes of a token store (configs/prior_*.yaml; "
        "data.store names the store). The store's tokenizer decodes the sample grids and is recorded in the "
        "prior's lineage. Rerunning with the same run.name resumes from the latest checkpoint.",
    )
    add_config_options(parser)
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> TrainSummary:
    from tokenmill.pipeline.prior.config import load_prior_config
    from tokenmill.pipeline.training.driver import train_prior

    config = load_prior_config(args.config, args.overrides)  # exits 2 on a bad config, before Ray
    check_run_outputs(config.run)
    if config.data.item_log:
        check_output_setting(config.data.item_log, "data.item_log", marks=None)
    with train_refused_cleanly(config.run):
        summary = train_prior(config)
    metrics = summary.final_metrics
    print(f"trained prior {summary.run_name}: step {metrics['step']}  "
          f"val bits/token {metrics.get('val/bits_per_token', float('nan')):.4f}")
    print(f"  model     {summary.model_dir}  ({summary.model_uri})")
    print(f"  store     {summary.details['store']}  (tokenizer {summary.details['tokenizer_uri']})")
    print(f"  mlflow    {summary.mlflow_tracking_uri}  run {summary.mlflow_run_id}")
    return summary


if __name__ == "__main__":
    from tokenmill.jobs.cli import module_main

    sys.exit(module_main("train-prior"))
