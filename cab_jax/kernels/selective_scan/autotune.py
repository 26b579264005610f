"""Finds the fastest Pallas block sizes for one scan shape on the current device.

    python -m cab_jax.kernels.selective_scan.autotune --shape=128,197,768,16 [--unidirectional]

Times forward+backward (softplus, D, z gate, as in Vim's mixer) for each candidate: a few tilings around the
backend's defaults, and on GPU sparser saved states (``save_every``, less memory). Prints a table with each
candidate's scratch memory and the config flag that selects the fastest, e.g.
``--config.student.scan_blocks=2,32,1,1,1``. A candidate that fails to compile is reported and skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cab_jax.kernels.selective_scan.api import resolve_impl, selective_scan, selective_scan_bidirectional
from cab_jax.kernels.selective_scan.pallas_common import BlockSizes, ScanDirection
from cab_jax.timing import median_ms, temp_mib


class ScanShape(NamedTuple):
    batch: int
    length: int
    d_inner: int
    d_state: int
    bidirectional: bool = True


def random_inputs(shape: ScanShape, dtype: str, seed: int = 0) -> tuple[list[ScanDirection], jax.Array]:
    """Per direction u, delta, A (Mamba's S4D-like init), B, C, D, delta_bias; and z. Scales as in training."""
    batch, length, d_inner, d_state, bidirectional = shape
    rng = np.random.default_rng(seed)
    act = lambda scale=1.0: jnp.asarray(scale * rng.normal(size=(batch, length, d_inner)), dtype)
    dirs = []
    for _ in range(2 if bidirectional else 1):
        A = -np.arange(1, d_state + 1)[None, :] * rng.uniform(0.5, 1.5, (d_inner, d_state))
        dirs.append(ScanDirection(
            u=act(), delta=act(0.5), A=jnp.asarray(A, jnp.float32),
            B=jnp.asarray(rng.normal(size=(batch, length, d_state)), dtype),
            C=jnp.asarray(rng.normal(size=(batch, length, d_state)), dtype),
            D=jnp.asarray(rng.normal(size=d_inner), jnp.float32),
            delta_bias=jnp.asarray(np.log(np.expm1(rng.uniform(1e-3, 0.1, d_inner))), jnp.float32)))
    return dirs, act()


def scan_fn(impl: str, n_dirs: int, blocks: BlockSizes | None = None) -> Callable[..., jax.Array]:
    """fn(dirs, z): the gated scan of one direction or of Vim's two, with delta softplus."""

    def run(dirs, z):
        if n_dirs == 2:
            return selective_scan_bidirectional(*dirs, z, delta_softplus=True, impl=impl, blocks=blocks)
        d = dirs[0]
        return selective_scan(d.u, d.delta, d.A, d.B, d.C, D=d.D, z=z, delta_bias=d.delta_bias,
                              delta_softplus=True, impl=impl, blocks=blocks)

    return run


def candidates(shape: ScanShape, kernel: str | None = None) -> list[BlockSizes]:
    """Tilings to try for ``shape`` with ``kernel`` ("pallas_tpu", "pallas_triton" or "pallas_mosaic"; default: the
    current backend's), the defaults first."""
    kernel = kernel or resolve_impl("pallas")
    if kernel == "pallas_tpu":
        from cab_jax.kernels.selective_scan import pallas_tpu

        base = pallas_tpu.default_blocks(shape.d_state)
        widths = [w for w in (128, 256, 512) if w <= max(128, shape.d_inner)]
        tiles = [BlockSizes(chunk=c, block_d=w) for c in (8, 16, 32) for w in widths]
    elif kernel == "pallas_mosaic":  # 128 channels per program, every chunk start saved: chunk and tile vary
        from cab_jax.kernels.selective_scan import pallas_gpu_mosaic

        base = pallas_gpu_mosaic.default_blocks(shape.d_state)
        # the backward unrolls a chunk: chunks above 2 compile for many minutes (BENCHMARKS.md)
        tiles = [dataclasses.replace(base, chunk=c, num_stages=s) for c in (1, 2) for s in (1, 2, 4)]
    else:
        from cab_jax.kernels.selective_scan import pallas_gpu_triton

        base = pallas_gpu_triton.default_blocks(shape.d_state)
        tiles = [BlockSizes(chunk=c, block_d=w, num_warps=max(1, w // 32))
                 for c in (1, 2, 4) for w in (max(8, base.block_d // 2), base.block_d, 2 * base.block_d)]
        tiles += [dataclasses.replace(base, save_every=s) for s in (2, 4, 8, 16)]  # less memory
    return list(dict.fromkeys([base, *tiles]))


def autotune(shape: ScanShape, *, dtype: str = "float32", blocks: list[BlockSizes] | None = None,
             iters: int = 10, timer: Callable[..., float] = median_ms) -> tuple[BlockSizes, list[dict]]:
    """(fastest block sizes, a row per candidate) for the current backend's Pallas forward+backward at ``shape``.

    ``blocks`` defaults to ``candidates(shape)``; ``timer(fn, args, iters)`` returns milliseconds.
    """
    dirs, z = random_inputs(shape, dtype)
    kernel = resolve_impl("pallas")
    rows = []
    for b in blocks or candidates(shape, kernel):
        run = scan_fn(kernel, len(dirs), b)
        fwd_bwd = jax.jit(lambda dirs, z, run=run: jax.vjp(run, dirs, z)[1](jnp.ones_like(z)))
        try:
            compiled = fwd_bwd.lower(dirs, z).compile()  # once, for the timing and the memory
            ms = round(timer(compiled, (dirs, z), iters), 3)
            rows.append({"blocks": b, "fwd+bwd ms": ms, "temp MiB": temp_mib(compiled)})
        except Exception as e:  # e.g. out of registers or shared memory: report it and go on
            rows.append({"blocks": b, "error": f"{type(e).__name__}: {e}".splitlines()[0][:120]})
    timed = [r for r in rows if "error" not in r]
    if not timed:
        raise RuntimeError(f"autotune: every candidate failed at {shape}: {[r['error'] for r in rows]}")
    return min(timed, key=lambda r: r["fwd+bwd ms"])["blocks"], rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True, help="batch,length,d_inner,d_state")
    parser.add_argument("--unidirectional", action="store_true", help="one direction (default: Vim's two)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        batch, length, d_inner, d_state = map(int, args.shape.split(","))
    except ValueError:
        parser.error(f"--shape must be four integers batch,length,d_inner,d_state, got {args.shape!r}")
    shape = ScanShape(batch, length, d_inner, d_state, not args.unidirectional)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {shape}, {args.dtype}, "
          f"kernel {resolve_impl('pallas')}")
    if jax.default_backend() == "cpu":
        print("warning: on CPU the GPU kernel runs interpreted; these timings say nothing about a GPU")
    best, rows = autotune(shape, dtype=args.dtype, iters=args.iters)
    print(f"  {'blocks':<16} {'fwd+bwd ms':>10} {'temp MiB':>9}")
    for row in rows:
        timing = f"{row['fwd+bwd ms']:>10} {row['temp MiB']!s:>9}" if "error" not in row else row["error"]
        print(f"  {row['blocks']!s:<16} {timing}")
    print(f"fastest: --config.student.scan_blocks={best}")


if __name__ == "__main__":
    main()
