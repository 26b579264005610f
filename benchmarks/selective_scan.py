"""Selective-scan speed per implementation and shape: forward and forward+backward time, achieved bandwidth.

    python benchmarks/selective_scan.py --shapes=vim_ti,vim_s,vim_b,long --impls=pallas_mosaic,pallas_triton,associative

GB/s and "% roofline" count only the bytes that must move at least once: every input read once and the output
written once (forward), plus the output gradient read once and every input gradient written once (forward+backward),
divided by the time; the roofline is the device's peak HBM bandwidth. "temp MiB" is the compiled forward+backward's
scratch memory (what it saves for the backward pass, partial sums), "compile s" the time to compile each pass
(``--forward_only`` skips the backward). The Vim shapes are bidirectional (two directions with their own u, delta,
A, B, C, D, delta_bias, one z), as in Vim's mixer; "long" is one direction; "tiny" (bidirectional) is the tests',
small enough for a CPU. Impls are ``selective_scan``'s ("pallas_mosaic", "pallas_triton", "associative"...).
``--check`` also prints the largest difference to the sequential reference (relative to its largest value), of the
output and, over every input, of the gradients. The impls of one shape and dtype run on the same inputs, all
compiled before any is timed; ``--rounds=R`` times them in turn R times (each time the median of ``--iters``
calls) and gives each the median over the rounds and, beside the first impl, the median of its ratio to it in the
same round, so that a drift of the GPU's clock falls on every impl alike. With ``--lock=FILE`` the timing holds an
exclusive lock on FILE, so several processes can compile at once and time in turns
(``benchmarks/scan_three_way.sh`` does this).
``--profile`` runs each impl's last pass once more between the CUDA driver's profiler start and stop, for Nsight
Compute:
``ncu --profile-from-start off python benchmarks/selective_scan.py ... --profile``.
Prints one JSON row per measurement as it comes, then a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import SCAN_SHAPES, error_message, gpu_turn, hbm_peak_gbps, relative_error  # benchmarks/common.py

from cab_jax.kernels.selective_scan import BlockSizes
from cab_jax.kernels.selective_scan.autotune import ScanShape, random_inputs, scan_fn
from cab_jax.summary import markdown_table
from cab_jax.timing import median_ms, temp_mib


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class Compiled:
    """One implementation's compiled passes at one shape and dtype, and its row so far."""

    row: dict
    passes: list[tuple[str, Callable, int]]  # (label, compiled fn(dirs, z), bytes it must move)
    times: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # label: ms of each round


def compile_impl(name: str, impl: str, dtype: str, inputs: tuple, blocks: BlockSizes | None,
                 backward: bool = True) -> Compiled:
    dirs, z = inputs
    run = scan_fn(impl, len(dirs), blocks)
    start = time.perf_counter()
    fwd = jax.jit(run).lower(dirs, z).compile()
    row = {"shape": name, "impl": impl, "dtype": dtype, "fwd compile s": round(time.perf_counter() - start, 1)}
    y_shape = jax.eval_shape(run, dirs, z)
    fwd_bytes = nbytes((dirs, z)) + nbytes(y_shape)
    passes = [("fwd", fwd, fwd_bytes)]
    if backward:
        dy = jnp.ones(y_shape.shape, y_shape.dtype)
        start = time.perf_counter()
        fwd_bwd = jax.jit(lambda dirs, z: jax.vjp(run, dirs, z)[1](dy)).lower(dirs, z).compile()
        row["fwd+bwd compile s"] = round(time.perf_counter() - start, 1)
        row["fwd+bwd temp MiB"] = temp_mib(fwd_bwd)
        passes.append(("fwd+bwd", fwd_bwd, fwd_bytes + nbytes(dy) + nbytes((dirs, z))))
    return Compiled(row, passes)


def time_rounds(compiled: list[Compiled], inputs: tuple, iters: int, rounds: int) -> None:
    """``rounds`` times, each implementation's passes in turn (median of ``iters`` calls each; every other round in
    reverse order): drift of the device's clock or of a neighbour's load falls on every implementation alike. Fills
    each row's median ms and GB/s over the rounds and, beside the first implementation, the median over rounds of
    its ratio to it. An implementation that fails (e.g. out of memory) gets the error in its row and drops out."""
    for r in range(rounds):
        for c in compiled[::-1] if r % 2 else compiled:
            try:
                if "error" not in c.row:
                    for label, fn, _ in c.passes:
                        c.times.setdefault(label, []).append(median_ms(fn, inputs, iters))
            except Exception as e:
                c.row["error"] = error_message(e)
    for c in compiled:
        for label, _, moved in c.passes if "error" not in c.row else ():
            ms = float(np.median(c.times[label]))
            c.row[f"{label} ms"] = round(ms, 3)
            c.row[f"{label} GB/s"] = round(moved / ms / 1e6, 1)
            first = compiled[0]
            if rounds > 1 and "error" not in first.row and label in first.times:
                ratios = np.divide(c.times[label], first.times[label])
                c.row[f"{label} / {first.row['impl']}"] = round(float(np.median(ratios)), 3)


def reference_values(inputs: tuple, backward: bool) -> tuple:
    """The sequential reference's output and (with ``backward``) its input gradients for an output gradient of
    ones: what every impl of a group is checked against, computed once."""
    dirs, z = inputs
    reference = scan_fn("reference", len(dirs), None)
    y = jax.jit(reference)(dirs, z)
    if not backward:
        return y, None
    dy = jnp.ones(y.shape, y.dtype)
    return y, jax.jit(lambda dirs, z: jax.vjp(reference, dirs, z)[1](dy))(dirs, z)


def check_errors(c: Compiled, inputs: tuple, reference: tuple) -> None:
    """The row's largest difference to ``reference`` (``reference_values``): output and, with the backward, every
    gradient."""
    (_, fwd, _), *backward = c.passes
    y_ref, grads_ref = reference
    c.row["max |y - ref| / max |ref|"] = relative_error(fwd(*inputs), y_ref)
    if backward:
        c.row["max grad error"] = max(map(relative_error, jax.tree.leaves(backward[0][1](*inputs)),
                                          jax.tree.leaves(grads_ref)))


def measure_group(name: str, impls: list[str], dtype: str, args: argparse.Namespace,
                  blocks: BlockSizes | None) -> list[dict]:
    """The rows of ``impls`` at one shape and dtype: all compiled first (on the same inputs), then timed in
    ``args.rounds`` interleaved rounds, holding ``args.lock``; an implementation that fails gives an error row."""
    inputs = random_inputs(ScanShape(*SCAN_SHAPES[name]), dtype)
    rows, compiled = [], []
    for impl in impls:
        try:
            compiled.append(compile_impl(name, impl, dtype, inputs, blocks, not args.forward_only))
            rows.append(compiled[-1].row)
        except Exception as e:  # e.g. out of memory: report it and go on
            rows.append({"shape": name, "impl": impl, "dtype": dtype, "error": error_message(e)})
    with gpu_turn(args.lock):
        time_rounds(compiled, inputs, args.iters, args.rounds)
        reference = None
        for c in compiled:
            try:
                if args.check and "error" not in c.row:
                    reference = reference or reference_values(inputs, not args.forward_only)
                    check_errors(c, inputs, reference)
                if args.profile and "error" not in c.row:
                    with cuda_profiler():
                        jax.block_until_ready(c.passes[-1][1](*inputs))
            except Exception as e:  # e.g. the float64 reference out of memory
                c.row["error"] = error_message(e)
    return rows


@contextlib.contextmanager
def cuda_profiler():
    """What runs inside is what ``ncu --profile-from-start off`` profiles (the driver's cuProfilerStart/Stop)."""
    driver = ctypes.CDLL("libcuda.so.1")
    driver.cuProfilerStart()
    try:
        yield
    finally:
        driver.cuProfilerStop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="vim_ti,vim_s,vim_b,long")
    parser.add_argument("--impls", default="associative,reference,pallas")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="time the impls in turn this many times (medians)")
    parser.add_argument("--peak_gbps", type=float, default=0.0, help="HBM peak; 0 = from the device name")
    parser.add_argument("--blocks", default="", help="Pallas block sizes chunk,block_d,num_warps,num_stages,save_every")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--lock", help="compile each row first, then time it holding an exclusive lock on this file")
    parser.add_argument("--forward_only", action="store_true", help="time the forward pass only")
    parser.add_argument("--profile", action="store_true", help="after the timings, run the last pass once more "
                        "for ncu --profile-from-start off")
    parser.add_argument("--mosaic_params", default="", help="Mosaic GPU CompilerParams flags set to True in both "
                        "pallas_mosaic kernels, e.g. unsafe_no_auto_barriers,approx_math (the forward always runs "
                        "without automatic barriers)")
    args = parser.parse_args()
    if args.mosaic_params:
        from jax.experimental.pallas import mosaic_gpu as plgpu

        from cab_jax.kernels.selective_scan import pallas_gpu_mosaic

        flags = dict.fromkeys(args.mosaic_params.split(","), True)
        pallas_gpu_mosaic.FORWARD_PARAMS = plgpu.CompilerParams(**{**flags, "unsafe_no_auto_barriers": True})
        pallas_gpu_mosaic.BACKWARD_PARAMS = plgpu.CompilerParams(**flags)
    kind = jax.devices()[0].device_kind
    peak = args.peak_gbps or hbm_peak_gbps(kind)
    blocks = BlockSizes.parse(args.blocks) if args.blocks else None
    print(f"device: {kind}, jax {jax.__version__}, peak HBM {peak or '?'} GB/s, blocks {blocks or 'default'}, "
          f"Mosaic GPU params {args.mosaic_params or 'default'}")
    rows = []
    for name in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            for row in measure_group(name, args.impls.split(","), dtype, args, blocks):
                if peak:
                    for label in ("fwd", "fwd+bwd"):
                        if f"{label} GB/s" in row:
                            row[f"{label} % roofline"] = round(100 * row[f"{label} GB/s"] / peak, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)  # each group's rows as they come: a cut-off run keeps them
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
