"""Training progress on the driver's console, whether or not Ray forwards worker output.

Rank 0 posts events to a small actor (`ProgressBoard`); the driver polls it from a thread and
draws one tqdm bar of steps, with rank 0's lines (validation, "resumed from") printed above
it. The actor is the driver's, so it outlives worker-group restarts and works on a cluster.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

POLL_S = 0.5


class ProgressBoard:
    """Ray actor: events posted by rank 0, taken by the driver. An event is ("step", step,
    postfix) or ("line", step, text)."""

    def __init__(self):
        self._events: list[tuple[str, int, str]] = []

    def post(self, event: tuple[str, int, str]) -> None:
        self._events.append(event)

    def take(self) -> list[tuple[str, int, str]]:
        events, self._events = self._events, []
        return events


def post(board: Any, event: tuple[str, int, str]) -> None:
    """Post `event` to a board: the Ray actor of a Ray Train run, or an in-process ProgressBoard."""
    if hasattr(board.post, "remote"):
        board.post.remote(event)
    else:
        board.post(event)


class TrainProgress:
    """`with TrainProgress(steps) as progress:` hand `progress.board` to rank 0, then fit.
    `in_process`: rank 0 runs in this process (no Ray): the board is a plain object."""

    def __init__(self, total_steps: int, desc: str = "train", in_process: bool = False):
        self.total_steps, self.desc, self.in_process = total_steps, desc, in_process
        self._stop = threading.Event()

    def __enter__(self) -> TrainProgress:
        from tqdm import tqdm

        if self.in_process:
            self.board = ProgressBoard()
        else:
            import ray

            self.board = ray.remote(num_cpus=0)(ProgressBoard).remote()
        self.bar = tqdm(total=self.total_steps, desc=self.desc, unit="step", file=sys.stderr)
        self._thread = threading.Thread(target=self._poll, name="train-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()
        self.bar.close()
        if not self.in_process:
            import ray

            ray.kill(self.board)

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            self._drain()

    def _drain(self) -> None:
        try:
            if self.in_process:
                events = self.board.take()
            else:
                import ray

                events = ray.get(self.board.take.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - progress display only; training reports its own failures
            return
        for kind, step, text in events:
            if kind == "line":
                self.bar.write(text, file=sys.stderr)
            else:
                self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(step - self.bar.n)  # validation lines come at steps the loss lines may skip
