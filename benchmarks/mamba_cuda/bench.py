"""Speed of mamba-ssm's own selective-scan CUDA kernels (float32, and bfloat16 where build.sh built them with
DTYPES=fp32,bf16), built by benchmarks/mamba_cuda/build.sh, on the
shapes of benchmarks/selective_scan.py, with that script's byte accounting so the GB/s are comparable.
From the repository root, with mamba's sources in a checkout (they are not in this repository):

    MAMBA_CSRC=mamba/csrc/selective_scan bash benchmarks/mamba_cuda/build.sh
    python3 benchmarks/mamba_cuda/bench.py [--iters 20] [--shapes vim_ti,vim_s,vim_b,long]

Calls the extension directly, as mamba_ssm.ops.selective_scan_interface.SelectiveScanFn does:
    out, x, out_z = fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    du, ddelta, dA, dB, dC, dD, ddelta_bias, dz = bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out,
                                                      None, delta_softplus, False)
Layout: u, delta, z (batch, d_inner, length); B, C (batch, 1, d_state, length); A (d_inner, d_state); D,
delta_bias (d_inner,); A, D and delta_bias float32, the others in --dtypes' dtype (mamba's bfloat16 path takes
bfloat16 activations, B and C with float32 weights, as Vim runs it under autocast).

The Vim shapes run two directions as Vim's mixer does (two independent scans, each gated by z). Two rows:
  "2 scans"          two fwd calls (and two bwd calls) on inputs already laid out for each direction;
  "2 scans + flips"  inputs and result in sequence order, as our benchmark's bidirectional scan takes them:
                     the backward direction's u, delta, B, C, z flipped (copies) before its scan, its output
                     flipped back and added; in fwd+bwd the dout flipped and du, ddelta, dB, dC, dz flipped back
                     (dz summed), as autograd would.
Bytes: every input read once (two directions, ONE z) + the output written once (fwd); fwd+bwd adds dout read
once and every input gradient written once. Timing: median wall time of --iters calls, each followed by
torch.cuda.synchronize(), after warm-up (like cab_jax.timing.median_ms); --timer events uses CUDA events.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[1])]

from common import SCAN_SHAPES, hbm_peak_gbps  # benchmarks/common.py  # noqa: E402


def load_extension(build_dir: pathlib.Path, name: str = "selective_scan_cuda"):
    """Imports the extension ``build_dir/<name>*.so`` (torch first; lazy binding in case a symbol is missing).
    Local binding: loaded with RTLD_GLOBAL, its symbols broke cuDNN, whose next convolution segfaulted."""
    if not list(build_dir.glob(f"{name}*.so")):
        sys.exit(f"bench.py: no {name}*.so in {build_dir}: run benchmarks/mamba_cuda/build.sh first")
    old = sys.getdlopenflags()
    sys.setdlopenflags(os.RTLD_LAZY)
    sys.path.insert(0, str(build_dir))
    try:
        return importlib.import_module(name)
    finally:
        sys.setdlopenflags(old)
        sys.path.pop(0)


# ---------------------------------------------------------------------------------------------------------
# inputs


def make_direction(batch, length, d_inner, d_state, gen, dev, requires_grad=False, dtype=torch.float32):
    f32 = dict(device=dev, dtype=torch.float32)
    randn = lambda *s: torch.randn(*s, generator=gen, **f32)
    rand = lambda *s: torch.rand(*s, generator=gen, **f32)
    d = dict(
        u=randn(batch, d_inner, length),
        delta=0.5 * randn(batch, d_inner, length),
        A=-torch.arange(1, d_state + 1, **f32)[None, :] * (0.5 + rand(d_inner, d_state)),
        B=randn(batch, 1, d_state, length),
        C=randn(batch, 1, d_state, length),
        D=randn(d_inner),
        delta_bias=torch.log(torch.expm1(1e-3 + (0.1 - 1e-3) * rand(d_inner))),
    )
    d = {k: v if k in ("A", "D", "delta_bias") else v.to(dtype) for k, v in d.items()}
    if requires_grad:
        for v in d.values():
            v.requires_grad_(True)
    return d


def input_bytes(dirs, z) -> tuple[int, int]:
    """(fwd bytes, fwd+bwd bytes) with benchmarks/selective_scan.py's accounting: every input read once and the
    output (z's size and dtype) written once; fwd+bwd adds dy read once and every input gradient written once."""
    inputs = sum(v.numel() * v.element_size() for d in dirs for v in d.values()) + z.numel() * z.element_size()
    act = z.numel() * z.element_size()
    fwd = inputs + act
    return fwd, fwd + act + inputs


# ---------------------------------------------------------------------------------------------------------
# calls


def scan_fwd(ext, d, z):
    out, x, out_z = ext.fwd(d["u"], d["delta"], d["A"], d["B"], d["C"], d["D"], z, d["delta_bias"], True)
    return out, x, out_z


def scan_bwd(ext, d, z, out, x, dout):
    # SelectiveScanFn.backward: bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz=None,
    #                                delta_softplus, recompute_out_z=False)
    return ext.bwd(d["u"], d["delta"], d["A"], d["B"], d["C"], d["D"], z, d["delta_bias"], dout, x, out, None,
                   True, False)


def flipped(d, z):
    """The backward direction's inputs in scan order (copies), as Vim's xz.flip([-1]) gives them."""
    return {**d, "u": d["u"].flip(-1), "delta": d["delta"].flip(-1), "B": d["B"].flip(-1),
            "C": d["C"].flip(-1)}, z.flip(-1)


def make_fns(ext, dirs, z, flips: bool):
    dout = torch.ones_like(z)
    if len(dirs) == 1:
        (d,) = dirs

        def fwd():
            return scan_fwd(ext, d, z)[2]

        def fwd_bwd():
            out, x, _ = scan_fwd(ext, d, z)
            return scan_bwd(ext, d, z, out, x, dout)

        return fwd, fwd_bwd

    df, db = dirs
    if not flips:  # two plain scans, each with its own inputs (db taken as already in its scan order)
        def fwd():
            return scan_fwd(ext, df, z)[2], scan_fwd(ext, db, z)[2]

        def fwd_bwd():
            of, xf, _ = scan_fwd(ext, df, z)
            ob, xb, _ = scan_fwd(ext, db, z)
            return scan_bwd(ext, df, z, of, xf, dout), scan_bwd(ext, db, z, ob, xb, dout)

        return fwd, fwd_bwd

    def fwd():  # sequence-order inputs -> one sequence-order output
        dbf, zf = flipped(db, z)
        return scan_fwd(ext, df, z)[2] + scan_fwd(ext, dbf, zf)[2].flip(-1)

    def fwd_bwd():
        dbf, zf = flipped(db, z)
        of, xf, _ = scan_fwd(ext, df, z)
        ob, xb, _ = scan_fwd(ext, dbf, zf)
        gf = scan_bwd(ext, df, z, of, xf, dout)
        gb = scan_bwd(ext, dbf, zf, ob, xb, dout.flip(-1))
        du, ddelta, dA, dB, dC, dD, ddb, dz = gb
        gb = (du.flip(-1), ddelta.flip(-1), dA, dB.flip(-1), dC.flip(-1), dD, ddb)
        return gf[:7], gb, gf[7] + dz.flip(-1)

    return fwd, fwd_bwd


def timed(fn, iters: int, warmup: int, timer: str) -> float:
    """Median milliseconds of ``iters`` calls of ``fn()``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if timer == "events":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------
# correctness


def reference_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True):
    """Sequential float32 selective scan in plain PyTorch (differentiable). Returns (out, out * silu(z))."""
    delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    Bv, Cv = B[:, 0], C[:, 0]  # (batch, d_state, length)
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (batch, d_inner, d_state)
    ys = []
    for t in range(u.shape[-1]):
        dt = delta[:, :, t, None]
        x = torch.exp(dt * A) * x + dt * Bv[:, None, :, t] * u[:, :, t, None]
        ys.append((x * Cv[:, None, :, t]).sum(-1))
    out = torch.stack(ys, -1) + D[None, :, None] * u
    return out, out * F.silu(z)


def check(ext, dev, batch, d_inner, length, d_state=16, seed=1, log=sys.stdout) -> float:
    """Max |forward - reference| at one shape (printed to ``log`` with the gradients' relative errors)."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    d = make_direction(batch, length, d_inner, d_state, gen, dev)
    z = torch.randn(batch, d_inner, length, generator=gen, device=dev)
    out, x, out_z = scan_fwd(ext, d, z)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in d.items()}
    zr = z.clone().requires_grad_(True)
    ref_out, ref_out_z = reference_scan(**leaves, z=zr)
    fwd_err = max((out - ref_out).abs().max().item(), (out_z - ref_out_z).abs().max().item())
    print(f"check b={batch} d={d_inner} l={length} n={d_state}: max |fwd - ref| = {fwd_err:.3e} "
          f"(max |ref| = {ref_out_z.abs().max().item():.3g})", file=log)
    # gradients (informational): mamba's bwd vs autograd through the reference, relative to max |ref grad|
    dout = torch.ones_like(z)
    grads = scan_bwd(ext, d, z, out, x, dout)
    ref_grads = torch.autograd.grad(ref_out_z, [*leaves.values(), zr], dout)
    names = ["du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias", "dz"]
    rel = {n: ((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
           for n, g, r in zip(names, grads, ref_grads, strict=True)}
    worst = max(rel.values())
    print("   bwd max |grad - ref| / max |ref|: " + ", ".join(f"{n} {v:.1e}" for n, v in rel.items()), file=log)
    if worst > 1e-3:
        print(f"   WARNING: a gradient differs from the reference by {worst:.1e} (relative)", file=log)
    return fwd_err


# ---------------------------------------------------------------------------------------------------------


def measure_shape(ext, dev, shape_name: str, dtype_name: str, dtype, args, peak: float) -> list[dict]:
    """The rows of one shape and dtype: one plain, and for two directions also one with the flips."""
    batch, length, d_inner, d_state, bi = SCAN_SHAPES[shape_name]
    variants = [False] if not bi else ([False] if args.no_flips else [False, True])
    gen = torch.Generator(device=dev).manual_seed(0)
    try:
        dirs = [make_direction(batch, length, d_inner, d_state, gen, dev, dtype=dtype) for _ in range(2 if bi else 1)]
        z = torch.randn(batch, d_inner, length, generator=gen, device=dev).to(dtype)
    except torch.cuda.OutOfMemoryError as e:
        return [{"shape": shape_name, "dtype": dtype_name, "fwd ms": f"OOM: {str(e).splitlines()[0][:60]}"}]
    fwd_bytes, bwd_bytes = input_bytes(dirs, z)
    rows = []
    for flips in variants:
        label = shape_name if not bi else f"{shape_name} (2 scans{' + flips' if flips else ''})"
        row = {"shape": label, "dtype": dtype_name}
        try:
            fwd, fwd_bwd = make_fns(ext, dirs, z, flips)
            for tag, fn, moved in (("fwd", fwd, fwd_bytes), ("fwd+bwd", fwd_bwd, bwd_bytes)):
                ms = timed(fn, args.iters, args.warmup, args.timer)
                row[f"{tag} ms"] = round(ms, 3)
                row[f"{tag} GB/s"] = round(moved / ms / 1e6, 1)
                if peak:
                    row[f"{tag} % roofline"] = round(100 * moved / ms / 1e6 / peak, 1)
        except torch.cuda.OutOfMemoryError as e:
            row["fwd ms"] = f"OOM: {str(e).splitlines()[0][:60]}"
        row["MB fwd / fwd+bwd"] = f"{fwd_bytes / 1e6:.0f} / {bwd_bytes / 1e6:.0f}"
        print(json.dumps({"impl": "mamba_cuda", **row}) if args.json else row,
              file=sys.stdout if args.json else sys.stderr, flush=True)
        rows.append(row)
    del dirs, z
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="vim_ti,vim_s,vim_b,long")
    p.add_argument("--dtypes", default="float32", help="float32 and/or bfloat16 (needs build.sh's DTYPES=fp32,bf16)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timer", choices=["wall", "events"], default="wall")
    p.add_argument("--no_flips", action="store_true", help="skip the '2 scans + flips' rows")
    p.add_argument("--skip_check", action="store_true")
    p.add_argument("--peak_gbps", type=float, default=0.0, help="HBM peak; 0 = from the device name")
    p.add_argument("--build_dir", default=str(HERE / "build"))
    p.add_argument("--json", action="store_true", help="one JSON row per measurement on stdout, no table")
    args = p.parse_args()

    if not torch.cuda.is_available():
        sys.exit("bench.py: no CUDA device")
    ext = load_extension(pathlib.Path(args.build_dir))
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak = args.peak_gbps or hbm_peak_gbps(name)
    info = sys.stderr if args.json else sys.stdout  # --json: stdout holds the rows only
    print(f"device: {name} (sm_{''.join(map(str, torch.cuda.get_device_capability(dev)))}), torch {torch.__version__},"
          f" CUDA {torch.version.cuda}, extension {ext.__file__}", file=info)
    print(f"peak HBM {peak or '?'} GB/s, timer {args.timer}, median of {args.iters} after {args.warmup} warm-up",
          file=info)

    if not args.skip_check:
        errs = [check(ext, dev, 2, 8, 37, log=info),  # seqlen <= 128 bucket, odd length
                check(ext, dev, 2, 8, 197, log=info),  # the Vim bucket (32 threads x 8 items)
                check(ext, dev, 1, 4, 2500, log=info)]  # two 2048-chunks, 128 x 16 bucket
        if max(errs) > 1e-3:
            sys.exit(f"bench.py: FAILED: the CUDA forward differs from the PyTorch reference by {max(errs):.3e} > 1e-3")
        print("forward check passed (max |diff| <= 1e-3)", file=info)

    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
        for shape_name in args.shapes.split(","):
            rows += measure_shape(ext, dev, shape_name, dtype_name, dtype, args, peak)

    if args.json:
        return
    cols = ["shape", "dtype", "fwd ms", "fwd+bwd ms", "fwd GB/s", "fwd+bwd GB/s", "fwd % roofline",
            "fwd+bwd % roofline", "MB fwd / fwd+bwd"]
    print()
    print(f"mamba-ssm selective_scan_cuda ({name}, torch {torch.__version__}, CUDA {torch.version.cuda})")
    from cab_jax.summary import markdown_table  # here: cab_torch/step.py imports this module and must not import JAX

    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
