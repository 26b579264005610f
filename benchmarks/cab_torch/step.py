"""The original CAB train step (wph6/CAB's PyTorch vision code: DeiT teacher -> Vim student, mode ``softdistill``)
timed on this GPU: the anchor that ``benchmarks/train_throughput.py``'s JAX step is compared with in the same run.
The sources come from a CAB checkout; none of them is in this repository:

    git clone https://github.com/wph6/CAB && git clone https://github.com/state-spaces/mamba
    MAMBA_CSRC=mamba/csrc/selective_scan BUILD_DIR=/tmp/cab_build bash benchmarks/mamba_cuda/build.sh
    python3 benchmarks/cab_torch/step.py --cab_root=CAB/vision_CAB --build_dir=/tmp/cab_build --batch_sizes=128,64

``build.sh`` builds the float32 selective-scan extension. It takes upstream mamba's csrc, not the mamba 1.1.1 copy
CAB vendors: that copy's ``reverse_scan.cuh`` calls ``cub::LaneId`` and ``cub::CTA_SYNC``, which CUDA 13's CUB no
longer has, and upstream's kernel sources differ from it only there and in one line for complex weights. This builds
``causal_conv1d_cuda`` from the checkout's ``causal-conv1d/csrc`` with ``torch.utils.cpp_extension`` (needs ninja,
three minutes on 16 cores) into ``--build_dir``, then imports CAB's ``Vim.models_dual_vit2vim`` with the checkout's own
``mamba_ssm`` and ``causal_conv1d`` packages first on ``sys.path``, and refuses to time anything unless the student
runs mamba's fused path (CUDA scan and conv, Triton RMSNorm).

The step is ``engine.train_one_epoch``'s without the data loader: forward (teacher under no_grad, student with its
B and C), ``soft_loss + atd_weight * distill_loss``, ``loss.item()``, ``zero_grad``, ``backward``, AdamW ``step``,
``torch.cuda.synchronize()``, on one fixed random batch. Float32 as ``run_distill.sh`` trains (``--no_amp``), TF32
matmuls on by default (``--tf32``). The student is built as CAB's ``dual_vit2vim_deit_*`` factories build it, except
its width (``--student_dim``: 384 is Vim-S, the width of ``configs/vim_small.py``; the factories fix 192) and its
stochastic depth (``--drop_path``, 0 like our config; VisionMamba's own default is 0.1). CAB's weight EMA
(``--ema``) is off by default because our step has none. One JSON row per batch size on stdout as it is measured.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import pathlib
import statistics
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "mamba_cuda"))

from bench import load_extension  # benchmarks/mamba_cuda/bench.py  # noqa: E402

TEACHERS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}  # DeiT width, heads (12 layers each)
CONV_NVCC_FLAGS = ["-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                   "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                   "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
                   "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "--threads", "4"]


def log(message: str) -> None:
    print(f"step.py: {message}", file=sys.stderr, flush=True)


def build_causal_conv1d(cab_root: pathlib.Path, build_dir: pathlib.Path):
    """causal_conv1d_cuda from the checkout's csrc, compiled with causal-conv1d's setup.py flags, or imported from
    ``build_dir/causal_conv1d`` where an earlier run left it."""
    from torch.utils import cpp_extension

    out = build_dir / "causal_conv1d"
    if list(out.glob("causal_conv1d_cuda*.so")):
        log(f"causal_conv1d_cuda imported from {out}")
        return load_extension(out, "causal_conv1d_cuda")
    csrc = cab_root / "causal-conv1d" / "csrc"
    sources = [csrc / n for n in ("causal_conv1d.cpp", "causal_conv1d_fwd.cu", "causal_conv1d_bwd.cu",
                                  "causal_conv1d_update.cu")]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        sys.exit(f"step.py: {cab_root} is not CAB's vision_CAB directory: missing {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    module = cpp_extension.load(name="causal_conv1d_cuda", sources=[str(s) for s in sources],
                                extra_cflags=["-O3"], extra_cuda_cflags=CONV_NVCC_FLAGS, build_directory=str(out))
    log(f"causal_conv1d_cuda built in {time.perf_counter() - start:.0f} s")
    return module


def import_cab(cab_root: pathlib.Path, build_dir: pathlib.Path):
    """CAB's DualViT2Vim class, with the checkout's mamba_ssm / causal_conv1d and the built extensions."""
    sys.modules["causal_conv1d_cuda"] = build_causal_conv1d(cab_root, build_dir)
    sys.modules["selective_scan_cuda"] = load_extension(build_dir)
    for sub in ("causal-conv1d", "mamba-1p1p1", ""):
        sys.path.insert(0, str(cab_root / sub))
    import transformers.generation as generation  # mamba 1.1.1 imports two names that transformers has renamed

    for old in ("GreedySearchDecoderOnlyOutput", "SampleDecoderOnlyOutput"):
        if not hasattr(generation, old):
            setattr(generation, old, generation.GenerateDecoderOnlyOutput)
    from mamba_ssm.ops import selective_scan_interface
    from Vim import models_dual_vit2vim, models_mamba

    if selective_scan_interface.causal_conv1d_cuda is None or models_mamba.RMSNorm is None:
        sys.exit("step.py: mamba's fused path is not importable (causal_conv1d_cuda or the Triton RMSNorm)")
    return models_dual_vit2vim.DualViT2Vim


def build_model(DualViT2Vim, args: argparse.Namespace) -> torch.nn.Module:
    from functools import partial

    width, heads = TEACHERS[args.teacher]
    teacher = dict(patch_size=16, embed_dim=width, depth=12, num_heads=heads, mlp_ratio=4, qkv_bias=True,
                   norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=1000)
    student = dict(patch_size=16, embed_dim=args.student_dim, depth=24, rms_norm=True, residual_in_fp32=True,
                   fused_add_norm=True, final_pool_type="mean", if_abs_pos_embed=True, if_rope=False,
                   if_rope_residual=False, bimamba_type="v2", if_cls_token=True, if_divide_out=True,
                   use_middle_cls_token=True, drop_path_rate=args.drop_path, num_classes=1000)
    model = DualViT2Vim(mode="softdistill", teacher_kwargs=teacher, student_kwargs=student,
                        kernel_type=args.kernel_type).cuda()
    for p in model.teacher.parameters():  # as main_vit2vim.py does
        p.requires_grad = False
    slow = [m for m in model.student.modules() if hasattr(m, "use_fast_path") and not m.use_fast_path]
    if slow:
        sys.exit(f"step.py: {len(slow)} Mamba mixers are off mamba's fused path")
    return model.train()


def measure(DualViT2Vim, args: argparse.Namespace, batch: int) -> dict:
    torch.manual_seed(0)
    model = build_model(DualViT2Vim, args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4 * batch / 512, weight_decay=0.05)  # CAB's scaled lr
    ema = None
    if args.ema:
        from timm.utils import ModelEma

        ema = ModelEma(model, decay=0.99996)
    images = torch.randn(batch, 3, 224, 224, device="cuda")
    losses = []

    def step():
        _, soft_loss, distill_loss = model(images)
        loss = soft_loss + args.atd_weight * distill_loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
        if ema is not None:
            ema.update(model)

    torch.cuda.reset_peak_memory_stats()
    log(f"batch {batch}: model built; warm-up (the first step autotunes the Triton RMSNorm)")
    for _ in range(args.warmup):
        step()
    log(f"batch {batch}: warm-up done, loss {losses[-1]:.4f}")
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    ms = 1e3 * statistics.median(times)
    return {"code": "CAB (PyTorch)", "teacher": f"DeiT-{args.teacher[0].upper()}", "student_dim": args.student_dim,
            "dtype": "float32" + (" (TF32 matmuls)" if args.tf32 else ""), "batch": batch,
            "images_per_s": round(batch * 1e3 / ms, 1), "ms_per_step": round(ms, 2),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "loss": round(losses[-1], 4),
            "ema": args.ema, "device": torch.cuda.get_device_name(), "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cab_root", type=pathlib.Path, required=True, help="a checkout's vision_CAB directory")
    p.add_argument("--build_dir", type=pathlib.Path, required=True, help="build.sh's BUILD_DIR")
    p.add_argument("--batch_sizes", default="128,64")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--teacher", choices=sorted(TEACHERS), default="small")
    p.add_argument("--student_dim", type=int, default=384)
    p.add_argument("--drop_path", type=float, default=0.0)
    p.add_argument("--kernel_type", default="softmax", help="CAB's --kernel_type (its default)")
    p.add_argument("--atd_weight", type=float, default=3.0, help="CAB's --atd_weight (its default)")
    p.add_argument("--tf32", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--ema", action="store_true", help="update CAB's weight EMA after every step, as CAB does")
    args = p.parse_args()
    faulthandler.enable()
    if not torch.cuda.is_available():
        sys.exit("step.py: needs a CUDA GPU and a CUDA build of torch")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    DualViT2Vim = import_cab(args.cab_root.resolve(), args.build_dir.resolve())
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        print(json.dumps(measure(DualViT2Vim, args, batch)), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
