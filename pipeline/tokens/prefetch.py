"""`prefetch`: iterate in a background thread, a bounded number of items ahead of the consumer.

The consumer gets the items in their order and the producer's exception (raised in the
consumer's thread, where training stops). Closing the iterator (a `for` left early, an exception
in the consumer, garbage collection) stops the producer at its next item and joins it: no thread
outlives the iteration, and a producer never blocks forever on a full queue.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_END = object()
_POLL_S = 0.05  # how soon a producer blocked on a full queue notices that the consumer left


def prefetch(items: Iterable[T], depth: int, name: str = "prefetch") -> Iterator[T]:
    """`items` produced in a thread named `name`, at most `depth` ahead; `depth` 0: in this thread."""
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put((_END, err))
        finally:
            getattr(source, "close", lambda: None)()  # a generator's own cleanup runs here, in its thread

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, err = slots.get()
            if item is _END:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        thread.join()
