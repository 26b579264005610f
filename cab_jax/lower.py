"""Export a config's train step for an accelerator from any machine: what a TPU pod or GPU host would compile.

    python -m cab_jax.lower --config=configs/vim_small.py --platforms=tpu,cuda --devices=8 \
        [--config.mesh.data=2 --config.mesh.fsdp=4 --config.FIELD=VALUE ...]

Builds the config's real train step (random weights, synthetic data, the global batch of ``train.batch_size``) on a
mesh of ``--devices`` fake CPU devices, with the selective scan's Pallas kernel of each target platform
(``student.scan_impl=pallas`` unless given), and exports it with ``jax.export`` for each platform, never
materialising a parameter. Then it checks the exported module: the target's scan kernel is there (Mosaic TPU
``tpu_custom_call``; on CUDA the Triton or Mosaic GPU kernel), once per device on its shard of the batch and of
d_inner, never on the global arrays, and no host callback is left in it. Prints one line per platform; exit status
1 when a check fails, 2 on a usage or config error. ``--memory_plan`` also prints the per-chip memory table of
``memory_plan.py`` (an estimate from shapes: state, teacher, gradients and activations per chip on TPU slices of
8, 32 and 256 chips, and the largest per-chip batch each TPU generation's HBM holds).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from cab_jax import cli, memory_plan, sharding, train
from cab_jax import config as config_lib
from cab_jax.kernels.selective_scan import lowering_for, resolve_impl
from cab_jax.kernels.selective_scan.api import TPU_GENERATIONS, tpu_vmem_bytes
from cab_jax.summary import markdown_table


def define_flags() -> None:
    """The command line's flags (defined on demand: other entry points that tests import define their own)."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/NAME.py[:variant]).",
                                    lock_config=True)
    flags.DEFINE_list("platforms", ["tpu", "cuda"], "jax.export platforms to lower for (tpu, cuda).")
    flags.DEFINE_integer("devices", 8, "Fake CPU devices the mesh is built from (the chips of one slice).")
    flags.DEFINE_enum("tpu", "v4", list(TPU_GENERATIONS), "TPU generation the TPU kernel is built for (its VMEM "
                      "sizes the kernel's budget).")
    flags.DEFINE_bool("memory_plan", False, "Also print the per-chip memory table (memory_plan.py) for TPU slices "
                      f"of {', '.join(map(str, memory_plan.SLICES))} chips.")


# The custom-call target of each scan kernel.
KERNEL_TARGETS = {"pallas_tpu": "tpu_custom_call", "pallas_triton": "__gpu$xla.gpu.triton",
                  "pallas_mosaic": "mosaic_gpu_v2"}
_CALLBACK = re.compile(r"callback", re.I)


@dataclasses.dataclass(frozen=True)
class Lowered:
    """One platform's exported step and what was found in it."""

    platform: str
    kernel: str  # the scan implementation traced for the platform ("associative", "xla": no kernel)
    calls: int  # kernel custom calls in the module
    call_shapes: tuple[tuple[int, ...], ...]  # the first operand's shape of each kernel call
    custom_calls: tuple[str, ...]  # every custom-call target in the module, sorted, once each
    seconds: float
    problems: tuple[str, ...]
    built_for: str = ""  # TPU: the generation the kernel was built for and its VMEM

    def line(self) -> str:
        status = "ok" if not self.problems else "FAILED: " + "; ".join(self.problems)
        shapes = ", ".join("x".join(map(str, s)) for s in sorted(set(self.call_shapes)))
        scan = (f"{self.kernel} kernel called {self.calls} times on shards {shapes}" if self.kernel in KERNEL_TARGETS
                else f"scan in XLA ({self.kernel})")
        target = f"{self.platform} ({self.built_for})" if self.built_for else self.platform
        return (f"{target}: {scan}; custom calls {', '.join(self.custom_calls) or 'none'}; exported in "
                f"{self.seconds:.1f} s: {status}")


def lowering_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``c`` with random weights and synthetic data (the step's program does not depend on them) and the Pallas
    scan where the config leaves the choice to the backend."""
    c = ml_collections.ConfigDict(c.to_dict())
    c.data.synthetic = True
    for model in ("student", "teacher"):
        if "init_from" in c.get(model, {}):
            c[model].init_from = ""
    if c.student.get("scan_impl") == "auto":
        c.student.scan_impl = "pallas"
    return c


def check(text: str, kernel: str, global_batch: int, shard_batch: int) -> tuple[int, list, list, list[str]]:
    """(kernel calls, their first operands' shapes, every custom-call target, problems) of an exported module's
    text, for a step whose scan is ``kernel`` over a global batch split into ``shard_batch`` rows per device."""
    targets = sorted(set(re.findall(r"custom_call @([\w$.\-]+)", text)))
    problems = [f"host callback {t}" for t in targets if _CALLBACK.search(t)]
    target = KERNEL_TARGETS.get(kernel)
    shapes = []
    if target is not None:
        for match in re.finditer(rf"custom_call @{re.escape(target)}\(.*?\)\s*(?:\{{.*?\}}\s*)?:\s*\(tensor<([^>]*)>",
                                 text):
            shapes.append(tuple(int(d) for d in match.group(1).split("x")[:-1]))
        if not shapes:
            problems.append(f"no {target} call: the {kernel} scan kernel is not in the step")
        whole = [s for s in shapes if s and s[0] == global_batch and global_batch != shard_batch]
        if whole:
            problems.append(f"{len(whole)} kernel calls on the global batch of {global_batch} (outside shard_map)")
        if any(s and s[0] != shard_batch for s in shapes):
            problems.append(f"kernel calls on batches {sorted({s[0] for s in shapes})}, not {shard_batch} rows per "
                            "device")
    return len(shapes), shapes, targets, problems


def lower(c: ml_collections.ConfigDict, platform: str, devices: list | None = None, tpu: str = "v4") -> Lowered:
    """Export ``c``'s train step for ``platform`` (a TPU of generation ``tpu``) on a mesh of ``devices`` (default:
    all) and check it."""
    c = lowering_config(c)
    mesh = sharding.make_mesh(c.mesh, devices)
    config_lib.validate(c, dict(mesh.shape))
    start = time.perf_counter()
    with lowering_for(platform, tpu=tpu):
        # Only the selective scan has kernels (the language student's SSD scan is XLA).
        kernel = resolve_impl(c.student.scan_impl) if "scan_impl" in c.student else "xla"
        built_for = f"{tpu}, {tpu_vmem_bytes() // 2**20} MiB VMEM" if platform == "tpu" else ""
        trainer, state, teacher = train.abstract_setup(c, mesh)
        batch = trainer.domain.train_batch_spec(c.train.batch_size)
        disabled = [jax.export.DisabledSafetyCheck.custom_call(t) for t in KERNEL_TARGETS.values()]
        try:
            exported = jax.export.export(trainer.jit_train_step, platforms=[platform], disabled_checks=disabled)(
                state, teacher, batch)
        except Exception as e:  # e.g. Mosaic TPU refuses a kernel outside shard_map: a failed check
            error = f"{type(e).__name__}: {e}".splitlines()[0]
            return Lowered(platform, kernel, 0, (), (), time.perf_counter() - start, (f"lowering failed: {error}",),
                           built_for)
    seconds = time.perf_counter() - start
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    calls, shapes, targets, problems = check(exported.mlir_module(), kernel, c.train.batch_size,
                                             c.train.batch_size // data_parallel)
    return Lowered(platform, kernel, calls, tuple(shapes), tuple(targets), seconds, tuple(problems), built_for)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
    f = flags.FLAGS
    unknown = set(f.platforms) - {"tpu", "cuda"}
    if unknown:
        cli.fail(f"--platforms: unknown {sorted(unknown)}; valid choices are tpu, cuda")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", max(f.devices, max(memory_plan.SLICES) if f.memory_plan else 0))
    c = f.config
    failed = False
    for platform in f.platforms:
        result = lower(c, platform, jax.devices()[:f.devices], f.tpu)
        print(result.line(), flush=True)
        failed |= bool(result.problems)
    if f.memory_plan:
        with lowering_for("tpu", tpu=f.tpu):  # the table is for TPU slices: the TPU kernel's saved states
            print(markdown_table(memory_plan.plan(lowering_config(c), jax.devices())), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    define_flags()
    flags.mark_flag_as_required("config")
    cli.run(main)
