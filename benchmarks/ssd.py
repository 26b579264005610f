"""Mamba-2 (SSD) scan speed per implementation and length: forward and forward+backward milliseconds.

    python benchmarks/ssd.py --lengths=2048,8192 --impls=reference,chunked

Defaults are Phi-Mamba's mixer (32 heads of head_dim 64, d_state 64, B and C per head: groups 32) at batch 4.
The backward pass differentiates y with respect to x, log_decay, B and C. ``--check`` also prints the largest
difference of y to the sequential reference. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import error_message, markdown_table  # benchmarks/common.py

from cab_jax.kernels.ssd import ssd
from cab_jax.timing import median_ms


def make_inputs(batch: int, length: int, heads: int, head_dim: int, groups: int, d_state: int, dtype: str,
                seed: int = 0) -> tuple[jax.Array, ...]:
    """x, log_decay = -softplus(A_log) as in Phi-Mamba, B, C (activations in ``dtype``, log_decay float32)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), dtype)
    log_decay = jnp.asarray(-np.logaddexp(0.0, rng.normal(size=(batch, length, heads))), jnp.float32)
    B = jnp.asarray(rng.normal(size=(batch, length, groups, d_state)) / np.sqrt(d_state), dtype)
    C = jnp.asarray(rng.normal(size=(batch, length, groups, d_state)) / np.sqrt(d_state), dtype)
    return x, log_decay, B, C


def measure(args: argparse.Namespace, length: int, impl: str) -> dict:
    inputs = make_inputs(args.batch, length, args.heads, args.head_dim, args.groups, args.d_state, args.dtype)
    run = functools.partial(ssd, impl=impl, chunk_size=args.chunk_size)
    fwd = jax.jit(run)
    y = fwd(*inputs)
    dy = jnp.ones_like(y)
    fwd_bwd = jax.jit(lambda *a: jax.vjp(run, *a)[1](dy))
    row = {"length": length, "impl": impl, "dtype": args.dtype}
    row["fwd ms"] = round(median_ms(fwd, inputs, args.iters), 3)
    row["fwd+bwd ms"] = round(median_ms(fwd_bwd, inputs, args.iters), 3)
    if args.check:
        y_ref = jax.jit(functools.partial(ssd, impl="reference"))(*inputs).astype(jnp.float32)
        row["max |y - ref| / max |ref|"] = float(jnp.max(jnp.abs(y.astype(jnp.float32) - y_ref))
                                                / jnp.max(jnp.abs(y_ref)))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--impls", default="reference,chunked")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--d_state", type=int, default=64)
    parser.add_argument("--chunk_size", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, batch {args.batch}, heads {args.heads}, "
          f"head_dim {args.head_dim}, groups {args.groups}, d_state {args.d_state}, chunk {args.chunk_size}")
    rows = []
    for length in map(int, args.lengths.split(",")):
        for impl in args.impls.split(","):
            try:
                row = measure(args, length, impl)
            except Exception as e:  # e.g. out of memory: report it and go on
                row = {"length": length, "impl": impl, "dtype": args.dtype, "error": error_message(e)}
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
