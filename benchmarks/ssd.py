"""Mamba-2 (SSD) scan speed per implementation and length: forward and forward+backward milliseconds.

    python benchmarks/ssd.py --lengths=2048,8192 --impls=reference,chunked
    python benchmarks/ssd.py --impls=chunked,mamba_triton --mamba_root=PATH/TO/mamba --check   # on a GPU

``mamba_triton`` is mamba-ssm's Triton SSD (``mamba_chunk_scan_combined``, torch), imported from a checkout of
state-spaces/mamba at ``--mamba_root`` (its sources are not vendored; nothing is built). It scales x by dt and
decays by exp(dt A): it runs with A = -1, dt = -log_decay and x / dt, which is the same scan.

Defaults are Phi-Mamba's mixer (32 heads of head_dim 64, d_state 64, B and C per head: groups 32) at batch 4.
The backward pass differentiates y with respect to x, log_decay, B and C. ``--check`` also prints the largest
difference of y to the sequential reference. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import error_message, relative_error, torch_median_ms  # benchmarks/common.py

from cab_jax.kernels.ssd import ssd
from cab_jax.summary import markdown_table
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


def mamba_chunk_scan(root: str):
    """mamba-ssm's ``mamba_chunk_scan_combined`` from the checkout at ``root``, without running the package's
    ``__init__`` (it loads mamba's CUDA extensions)."""
    package = types.ModuleType("mamba_ssm")
    package.__path__ = [str(pathlib.Path(root) / "mamba_ssm")]
    sys.modules.setdefault("mamba_ssm", package)
    return importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined


def mamba_timings(args: argparse.Namespace, inputs: tuple[jax.Array, ...]) -> tuple[float, float, np.ndarray]:
    """(fwd ms, fwd+bwd ms, y) of mamba-ssm's Triton SSD on ``inputs`` (x, log_decay, B, C)."""
    import torch

    scan = mamba_chunk_scan(args.mamba_root)
    dtype = getattr(torch, args.dtype)
    x, log_decay, B, C = (torch.from_numpy(np.asarray(a.astype(jnp.float32))).cuda() for a in inputs)
    dt = (-log_decay).requires_grad_()
    x = (x / dt[..., None]).to(dtype).detach().requires_grad_()
    B, C = (t.to(dtype).requires_grad_() for t in (B, C))
    A = -torch.ones(x.shape[2], device="cuda")
    run = lambda: scan(x, dt, A, B, C, args.chunk_size)
    y = run()
    dy = torch.ones_like(y)
    fwd_bwd = lambda: torch.autograd.grad(run(), (x, dt, B, C), dy)
    return (torch_median_ms(run, args.iters), torch_median_ms(fwd_bwd, args.iters),
            y.detach().float().cpu().numpy())


def measure(args: argparse.Namespace, length: int, impl: str) -> dict:
    inputs = make_inputs(args.batch, length, args.heads, args.head_dim, args.groups, args.d_state, args.dtype)
    row = {"length": length, "impl": impl, "dtype": args.dtype}
    if impl == "mamba_triton":
        row["fwd ms"], row["fwd+bwd ms"], y = mamba_timings(args, inputs)
    else:
        run = functools.partial(ssd, impl=impl, chunk_size=args.chunk_size)
        fwd = jax.jit(run)
        y = fwd(*inputs)
        dy = jnp.ones_like(y)
        fwd_bwd = jax.jit(lambda *a: jax.vjp(run, *a)[1](dy))
        row["fwd ms"] = round(median_ms(fwd, inputs, args.iters), 3)
        row["fwd+bwd ms"] = round(median_ms(fwd_bwd, inputs, args.iters), 3)
    row["fwd ms"], row["fwd+bwd ms"] = round(row["fwd ms"], 3), round(row["fwd+bwd ms"], 3)
    if args.check:
        y_ref = jax.jit(functools.partial(ssd, impl="reference"))(*inputs)
        row["max |y - ref| / max |ref|"] = relative_error(y, y_ref)
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
    parser.add_argument("--mamba_root", help="a checkout of state-spaces/mamba (impl mamba_triton)")
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
            print(row, flush=True)  # each row as it comes: a cut-off run keeps it
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
