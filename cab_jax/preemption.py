"""Stopping a run on SIGTERM/SIGINT (preemption, requeue, Ctrl-C) at a step every process agrees on.

A signal reaches one process or all of them, at different moments. Each step, every process contributes its
flag to a tiny all-reduce that is dispatched asynchronously and read one step later, so all processes see the
same answer after the same step, save the checkpoint of that step together and exit with ``EXIT_RESUME``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cab_jax.errors import EXIT_RESUME


def exit_on_signals() -> None:
    """Outside the training loop (:class:`StopRequest` takes over inside it), SIGTERM/SIGINT end the process at once
    with ``EXIT_RESUME``: no step is lost (before the first one, or after the last one was saved), and a scheduler
    requeues the run, which resumes from its checkpoint. The handler calls ``os._exit``: an exception raised while
    XLA compiles (the minutes before the first step) makes the interpreter crash at exit (SIGSEGV, status 139, which
    a scheduler reads as a failure). Data workers exit with their parent."""

    def leave(signum, frame):
        logging.warning("Signal %d outside the training loop: exiting with status %d.", signum, EXIT_RESUME)
        logging.flush()
        sys.stderr.flush()
        os._exit(EXIT_RESUME)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, leave)


class StopRequest:
    """SIGINT/SIGTERM set this process's flag; :meth:`agreed` says, the same on every process, whether any
    process had its flag set one step ago. A second Ctrl-C aborts at once."""

    def __init__(self, mesh: Mesh):
        self.requested = False
        self._previous = {}
        self._sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
        self._any = jax.jit(jnp.any, out_shardings=NamedSharding(mesh, PartitionSpec()))
        self._pending: jax.Array | None = None

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # signals can only be set from the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logging.warning("Stop requested (signal %d): saving a checkpoint, then exiting with status %d.", signum,
                        EXIT_RESUME)

    def agreed(self) -> bool:
        """Call once per step on every process: True when some process's flag was set at the previous call."""
        if jax.process_count() == 1:
            return self.requested
        local = np.full((len(self._sharding.addressable_devices),), self.requested)
        flags = jax.make_array_from_process_local_data(self._sharding, local)
        pending, self._pending = self._pending, self._any(flags)
        return pending is not None and bool(pending)

    def settled(self) -> bool:
        """Once after the loop, on every process: whether any process's flag was set by the time of this call (the
        last step's answer, then one more all-reduce)."""
        last_step = self.agreed()
        return self.agreed() or last_step

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
