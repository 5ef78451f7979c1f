"""Run many `tokenmill` command lines in ONE fresh process, each as `python -m jobs ARGS` would:
the exit code `python -m jobs` would end with (argparse's SystemExit, `main()`'s return value, 1 and
a printed traceback for anything else), and what the command wrote to file descriptors 1 and 2
(so Ray's, logging's and tqdm's output count too), and the seconds it took. One interpreter start instead of one per
command line: the bad-input table's 171 command lines cost seconds, not minutes.

    python tests/helpers/cli_batch.py IN.json OUT.json   (IN: [[id, [arg, ...]], ...]; run in the cwd)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
import traceback

TIMEOUT_S = 60  # a refusal takes well under a second: a command still running did work instead


class TimedOut(Exception):
    pass


def _on_alarm(signum, frame):
    raise TimedOut(f"timed out after {TIMEOUT_S} s")


def run_one(argv: list[str]) -> int:
    """`python -m jobs ARGV`'s exit code, in this process."""
    from tokenmill.jobs.cli import main

    signal.alarm(TIMEOUT_S)
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001 - exactly what an uncaught exception does to `python -m jobs`
        traceback.print_exc()
        return 1
    finally:
        signal.alarm(0)


def captured(argv: list[str]) -> dict:
    """Run `argv` with file descriptors 1 and 2 sent to temporary files; returns rc, stdout, stderr."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        start = time.perf_counter()
        try:
            code = run_one(argv)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        return {"returncode": code, "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace"), "seconds": round(time.perf_counter() - start, 3)}


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    signal.signal(signal.SIGALRM, _on_alarm)
    results = {case: captured(argv) for case, argv in cases}
    with open(sys.argv[2], "w") as out:
        json.dump(results, out)


if __name__ == "__main__":
    main()
