"""Wall-clock time and scratch memory of jitted functions (benchmarks and the block-size autotuner)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import numpy as np


def median_ms(fn: Callable, args: Sequence, iters: int) -> float:
    """Median milliseconds of ``iters`` calls of ``fn(*args)``, after one warm-up call (which compiles a jitted
    ``fn``)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def temp_mib(compiled: jax.stages.Compiled) -> float | None:
    """MiB of scratch (temporaries: residuals, partial sums) of a compiled function, if XLA says."""
    memory = compiled.memory_analysis()
    return None if memory is None else round(memory.temp_size_in_bytes / 2**20, 3)
