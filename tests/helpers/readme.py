"""The README's runnable command blocks, run as a newcomer pastes them.

A runnable block is a fenced ```bash block right after an HTML comment that names it
(`<!-- walkthrough -->`, `<!-- demo-follow-up -->`); every other block is prose and never runs.
Each block runs in its own `bash -e -o pipefail` (a failing line fails the block) with the
environment's `tokenmill` and `python` first on PATH and no tracking or Ray address set, as in a
new user's shell.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import REPO

README = REPO / "README.md"
BLOCK = re.compile(r"^<!-- ([\w-]+) -->\n```bash\n(.*?)^```$", re.M | re.S)
# What a user's shell lacks: the test session's tracking store and Ray, and verbose logging.
NOT_IN_A_USERS_SHELL = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "TOKENMILL_VERBOSE")


def readme_blocks(name: str, text: str | None = None) -> list[str]:
    """The bodies of the README's blocks marked `<!-- name -->`, in order."""
    text = README.read_text() if text is None else text
    return [body for marker, body in BLOCK.findall(text) if marker == name]


def user_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in NOT_IN_A_USERS_SHELL}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, **extra}


def run_block(block: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """One block in a fresh bash; `-x` echoes each command, so a failure shows which line broke."""
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-x", "-c", block], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    proc.stdout = proc.stdout.decode(errors="replace")  # not text=True: progress bars redraw with \r
    return proc


def failure(block: str, proc: subprocess.CompletedProcess) -> str:
    """What a failed block's assertion shows: the block, its exit code, the end of its output."""
    lines = [line.rsplit("\r", 1)[-1] for line in proc.stdout.split("\n")]
    return f"README block failed (rc={proc.returncode}):\n{block}\n--- output (end):\n" + "\n".join(lines[-60:])
