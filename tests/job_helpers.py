"""Helpers shared by the tests of the train and retrain jobs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.shards.writer import ShardSettings, write_shards

REPO = Path(__file__).resolve().parents[1]


def write_digits_shards(dest: Path, maxcount: int) -> Path:
    """builtin:digits (1,797 scikit-learn digits) as PNG shards of `maxcount` with a manifest."""
    write_shards("builtin:digits", str(dest), ShardSettings(maxcount=maxcount), progress=False)
    return dest


def run_misspelt_config(module: str, config: str, key: str, typo: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -m module` on a copy of `config` whose `key:` reads `typo:`; asserts the answer to a
    user mistake: exit 2, `<section>.<typo>: unknown key`, no traceback. The copy is proc.args[-1]."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(config).read_text().replace(f"{key}:", f"{typo}:"))
    proc = subprocess.run([sys.executable, "-m", module, str(bad)], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 2
    assert f".{typo}: unknown key" in proc.stderr and "Traceback" not in proc.stderr
    return proc
