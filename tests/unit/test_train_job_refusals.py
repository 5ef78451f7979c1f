"""`tokenmill train` refuses what it cannot train on before any work: missing shards exit 2 (a unit
test: the conftest guard fails it if it starts Ray). (The job on Ray: tests/integration/test_train_job.py.)"""

from __future__ import annotations

from helpers import CONFIGS

from tokenmill.jobs.cli import main as cli_main

DEBUG_CONFIG = str(CONFIGS / "debug_vqvae.yaml")


def test_missing_shards_exit_2(tmp_path):
    code = cli_main(["train", DEBUG_CONFIG, "--set", f"data.shards={tmp_path / 'nowhere'}",
                     "--set", f"run.root={tmp_path}"])
    assert code == 2

