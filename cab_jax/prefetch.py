"""Training batches read and placed on the devices ahead of the step that uses them.

A background thread takes local batches from the data iterator, makes them global device arrays (``put``) and keeps
up to ``size`` of them in a queue, so the host's reading, augmenting and host-to-device copy overlap the device's
step. The consumer's waiting time is counted, and the data state it reports is that of the batches it has taken,
not of the ones prefetched, so a checkpoint resumes at the right batch.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import grain

_END = object()


class DevicePrefetch:
    """Iterate ``put(batch)`` for the batches of ``iterator`` (a checkpointable grain iterator), ``size`` ahead.

    ``get_state()`` is the iterator's state after the last batch taken; ``take_wait_s()`` returns (and resets) the
    seconds ``__next__`` spent waiting; ``close()`` stops the thread and closes ``iterator``. An exception in the
    thread is raised by the next ``__next__``."""

    def __init__(self, iterator: grain.DatasetIterator, put: Callable[[Any], Any], size: int = 2):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._iterator, self._put = iterator, put
        self._state = iterator.get_state()
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._wait_s = 0.0
        self._thread = threading.Thread(target=self._fill, name="device_prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._put(next(self._iterator))
                self._offer((item, self._iterator.get_state()))
        except BaseException as e:  # handed to the consumer, which raises it
            self._offer((_END, e))

    def _offer(self, entry) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> DevicePrefetch:
        return self

    def __next__(self):
        start = time.perf_counter()
        item, state = self._queue.get()
        self._wait_s += time.perf_counter() - start
        if item is _END:
            raise state
        self._state = state
        return item

    def get_state(self) -> dict:
        return self._state

    def take_wait_s(self) -> float:
        wait, self._wait_s = self._wait_s, 0.0
        return wait

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.1)
        self._iterator.close()
