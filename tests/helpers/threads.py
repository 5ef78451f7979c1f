"""One torch thread for tiny loops: two threads on a loaded 2-core machine are much slower and less steady."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch runs on one thread inside the block; the caller's thread count is restored after it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
