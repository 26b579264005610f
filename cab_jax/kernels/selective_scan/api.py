"""Public entry points of the Mamba-1 selective scan: shape checks, dispatch on ``impl`` and, for the Pallas
kernels, the launch config handed to the backend's ``scan``.

``impl``: "reference" (sequential ``lax.scan``), "associative" (``lax.associative_scan``), "pallas_triton" and
"pallas_mosaic" (the GPU kernels lowered through Triton and through Mosaic GPU; on CPU they run interpreted,
slowly, for tests), "pallas" (the Pallas kernel of the current backend: Mosaic on TPU, on GPU the one
``gpu_kernel`` picks, the interpreted Triton kernel on CPU), or "auto": pallas on GPU and TPU, associative on
CPU, and associative with a warning on a GPU that neither GPU kernel supports. ``blocks`` tiles the Pallas
kernels (None: the kernel's tuned defaults; ``autotune.py`` finds the fastest for a shape) and is ignored by the
XLA implementations.

``lowering_for(platform)`` makes these choices for another platform than the one JAX runs on, so that a step
exported from a CPU machine for TPU or CUDA (``jax.export``) holds the kernel that platform would run.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import importlib.util
from collections.abc import Callable

import jax
import jax.numpy as jnp
from absl import logging

from cab_jax.kernels.selective_scan.associative import selective_scan_associative
from cab_jax.kernels.selective_scan.pallas_common import BlockSizes, KernelConfig, ScanDirection, with_defaults
from cab_jax.kernels.selective_scan.reference import finish_output, selective_scan_reference

# Valid values of ``impl`` (and of the config's ``student.scan_impl``).
SCAN_IMPLS: tuple[str, ...] = ("auto", "reference", "associative", "pallas", "pallas_triton", "pallas_mosaic")
_KERNEL_MODULES = {"pallas_tpu": "pallas_tpu", "pallas_triton": "pallas_gpu_triton",
                   "pallas_mosaic": "pallas_gpu_mosaic"}


# (platform, GPU compute capability, TPU generation) that ``lowering_for`` set, else None (the backend JAX runs on).
_TARGET: contextvars.ContextVar[tuple[str, str, str] | None] = contextvars.ContextVar("scan_target", default=None)
TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e")  # what ``lowering_for`` takes (JAX's TPU table knows their VMEM)
LOWERING_PLATFORMS = ("cpu", "cuda", "tpu")  # jax.export's names of the platforms ``lowering_for`` takes


@contextlib.contextmanager
def lowering_for(platform: str, compute_capability: str = "9.0", tpu: str = "v4"):
    """Within: "auto" and "pallas" resolve, and kernels compile (not interpret), for ``platform`` (one of
    ``LOWERING_PLATFORMS``) instead of the backend JAX runs on; ``compute_capability`` stands for the GPU's when
    ``platform`` is "cuda", ``tpu`` (one of ``TPU_GENERATIONS``) for the TPU's generation, whose VMEM sizes the TPU
    kernel's budget. For tracing a step that ``jax.export(..., platforms=[platform])`` exports (jit caches
    traces: trace a function here that was not traced outside)."""
    if platform not in LOWERING_PLATFORMS:
        raise ValueError(f"lowering_for: unknown platform {platform!r}; valid choices are {LOWERING_PLATFORMS}")
    if tpu not in TPU_GENERATIONS:
        raise ValueError(f"lowering_for: unknown TPU generation {tpu!r}; valid choices are {TPU_GENERATIONS}")
    token = _TARGET.set((platform, compute_capability, tpu))
    try:
        yield
    finally:
        _TARGET.reset(token)


def _backend() -> str:
    """The backend the scan is traced for: "cpu", "gpu" or "tpu"."""
    target = _TARGET.get()
    if target is None:
        return jax.default_backend()
    return "gpu" if target[0] == "cuda" else target[0]


def tpu_vmem_bytes() -> int:
    """VMEM per TensorCore of the TPU the kernel is built for: this machine's TPU, else the ``lowering_for``
    generation's (v4's 16 MiB, the smallest, outside it), from JAX's table of TPU generations."""
    from jax.experimental.pallas import tpu as pltpu

    if jax.default_backend() == "tpu":
        return pltpu.get_tpu_info().vmem_capacity_bytes
    target = _TARGET.get()
    return pltpu.get_tpu_info_for_chip(pltpu.ChipVersion(target[2] if target else "v4"), 1).vmem_capacity_bytes


def _compute_capability() -> str:
    target = _TARGET.get()
    return jax.devices()[0].compute_capability if target is None else target[1]


def resolve_impl(impl: str) -> str:
    """The implementation ``impl`` names on the current backend (or the ``lowering_for`` platform): "reference",
    "associative" or a kernel, "pallas_tpu", "pallas_triton" or "pallas_mosaic" ("auto" and "pallas" resolved)."""
    if impl not in SCAN_IMPLS:
        raise ValueError(f"selective_scan: unknown impl {impl!r}; valid choices are {SCAN_IMPLS}")
    backend = _backend()
    if impl == "auto" and backend == "cpu":
        return "associative"
    if impl not in ("auto", "pallas"):
        return impl
    if backend == "tpu":
        return "pallas_tpu"
    if backend == "cpu":
        return "pallas_triton"  # interpreted (tests)
    kernel = gpu_kernel(_compute_capability())
    if kernel is not None:
        return kernel
    if impl == "pallas":
        raise ValueError(f"selective_scan: impl 'pallas': {_NO_GPU_KERNEL}")
    _warn_no_gpu_kernel()
    return "associative"


_NO_GPU_KERNEL = ("no Pallas GPU kernel runs here: the Mosaic GPU kernel needs compute capability 9.0 (Hopper) or "
                  "newer, and this JAX no longer ships Pallas's Triton backend")


@functools.cache
def gpu_kernel(compute_capability: str) -> str | None:
    """The GPU kernel for a device of ``compute_capability`` ("9.0"): the Triton kernel while the installed JAX
    still ships Pallas's (deprecated) Triton backend: as fast as the Mosaic GPU kernel at Vim-S and compiled in
    seconds rather than minutes (BENCHMARKS.md); then the Mosaic GPU kernel on Hopper and newer; else None. Logs
    its choice once."""
    if importlib.util.find_spec("jax.experimental.pallas.triton") is not None:
        choice, why = "pallas_triton", ("as fast as pallas_mosaic and compiled in seconds, not minutes; "
                                         "JAX deprecates Pallas's Triton backend")
    elif int(compute_capability.split(".")[0]) >= 9:
        choice, why = "pallas_mosaic", "this JAX has no Pallas Triton backend"
    else:
        return None
    logging.info("selective scan: the %s kernel (compute capability %s; %s)", choice, compute_capability, why)
    return choice


@functools.cache
def _warn_no_gpu_kernel() -> None:
    logging.warning("selective scan: %s; impl 'auto' falls back to 'associative' (slower).", _NO_GPU_KERNEL)


def _pallas_launch(kernel: str, reverses: tuple[bool, ...], delta_softplus: bool, blocks: BlockSizes | None,
                   d_state: int, name_residuals: bool) -> tuple[Callable[..., jax.Array], KernelConfig]:
    """``kernel``'s ``scan(dirs, z, cfg)`` and the ``KernelConfig`` of one launch (``blocks`` None: the kernel's
    ``default_blocks``), interpreted on a backend the kernel does not compile for (tests)."""
    module = importlib.import_module(f"cab_jax.kernels.selective_scan.{_KERNEL_MODULES[kernel]}")
    cfg = KernelConfig(reverses, delta_softplus, blocks or module.default_blocks(d_state), _interpreted(kernel),
                       name_residuals)
    return module.scan, (dataclasses.replace(cfg, vmem_bytes=tpu_vmem_bytes()) if kernel == "pallas_tpu" else cfg)


def _interpreted(kernel: str) -> bool:
    return _backend() != ("tpu" if kernel == "pallas_tpu" else "gpu")


def _xla_impl(name: str) -> Callable[..., jax.Array]:
    return {"associative": selective_scan_associative, "reference": selective_scan_reference}[name]


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.ndim != 3:
        raise ValueError(f"selective_scan: u must have shape (batch, length, d_inner), got {tuple(u.shape)}")
    if A.ndim != 2:
        raise ValueError(f"selective_scan: A must have shape (d_inner, d_state), got {tuple(A.shape)}")
    batch, length, d_inner = u.shape
    d_state = A.shape[1]
    expected = {
        "delta": ((batch, length, d_inner), "(batch, length, d_inner)"),
        "A": ((d_inner, d_state), "(d_inner, d_state)"),
        "B": ((batch, length, d_state), "(batch, length, d_state)"),
        "C": ((batch, length, d_state), "(batch, length, d_state)"),
        "D": ((d_inner,), "(d_inner,)"),
        "z": ((batch, length, d_inner), "(batch, length, d_inner)"),
        "delta_bias": ((d_inner,), "(d_inner,)"),
    }
    given = {"delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    errors = [
        f"{name} has shape {tuple(x.shape)}, expected {names} = {shape}"
        for name, x in given.items()
        if x is not None
        for shape, names in [expected[name]]
        if tuple(x.shape) != shape
    ]
    if errors:
        raise ValueError(
            f"selective_scan: with u of shape (batch, length, d_inner) = {tuple(u.shape)} and "
            f"d_state = {d_state} (from A): " + "; ".join(errors)
        )


def selective_scan(
    u: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    delta_bias: jax.Array | None = None,
    delta_softplus: bool = False,
    reverse: bool = False,
    impl: str = "auto",
    blocks: BlockSizes | None = None,
    name_residuals: bool = False,
) -> jax.Array:
    """Mamba-1 selective scan (semantics in ``reference.py``) with the implementation chosen by ``impl``.

    u, delta, z: (batch, length, d_inner); A: (d_inner, d_state); B, C: (batch, length, d_state);
    D, delta_bias: (d_inner,). Returns y of shape (batch, length, d_inner) and dtype ``u.dtype``.
    ``impl`` is one of ``SCAN_IMPLS``. ``name_residuals`` (Pallas kernels): name the kernel's outputs kept for the
    gradient ``SCAN_RESIDUALS``, for a remat policy that saves them; without it a ``jax.checkpoint`` that saves
    nothing runs the kernel twice, first without saving states, then with them for the backward pass.
    """
    name = resolve_impl(impl)
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if name in _KERNEL_MODULES:
        scan, cfg = _pallas_launch(name, (reverse,), delta_softplus, blocks, A.shape[1], name_residuals)
        return scan((with_defaults(ScanDirection(u, delta, A, B, C, D, delta_bias)),), z, cfg)
    return _xla_impl(name)(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                           reverse=reverse)


def selective_scan_bidirectional(
    fwd: ScanDirection,
    bwd: ScanDirection,
    z: jax.Array | None = None,
    delta_softplus: bool = False,
    impl: str = "auto",
    blocks: BlockSizes | None = None,
    name_residuals: bool = False,
) -> jax.Array:
    """Vim's two directions over one sequence: (scan(fwd) + scan(bwd, reverse=True)) * silu(z).

    Both directions are given in sequence order (the backward one is scanned from the last position to the
    first) and each has its own u, delta, A, B, C, D, delta_bias; z gates their float32 sum once. The
    Pallas kernels run both in one launch, reading the backward direction in place. ``name_residuals`` as in
    ``selective_scan``.
    """
    for d in (fwd, bwd):
        _check_shapes(d.u, d.delta, d.A, d.B, d.C, d.D, z, d.delta_bias)
    if fwd.u.shape != bwd.u.shape or fwd.A.shape != bwd.A.shape:
        raise ValueError(f"selective_scan_bidirectional: the directions differ in shape: u {tuple(fwd.u.shape)} vs "
                         f"{tuple(bwd.u.shape)}, A {tuple(fwd.A.shape)} vs {tuple(bwd.A.shape)}")
    name = resolve_impl(impl)
    if name in _KERNEL_MODULES:
        scan, cfg = _pallas_launch(name, (False, True), delta_softplus, blocks, fwd.A.shape[1], name_residuals)
        return scan((with_defaults(fwd), with_defaults(bwd)), z, cfg)
    fn = _xla_impl(name)
    # Each direction ungated in float32 (inputs upcast: exact), then one gate and one cast.
    pre = sum(fn(d.u.astype(jnp.float32), d.delta, d.A, d.B, d.C, D=d.D, delta_bias=d.delta_bias,
                 delta_softplus=delta_softplus, reverse=reverse) for d, reverse in ((fwd, False), (bwd, True)))
    return finish_output(pre, pre, None, z, fwd.u.dtype)

