"""Variants of the CAB train step timed in turn in one process: is a change to the step faster than the spread
between runs?

    python benchmarks/step_ab.py --config=vim_small --dtype=float32 --batch_size=128 --steps=20 --rounds=5 \
        --variant=base: \
        --variant=dsf:train.xla_gpu_options=xla_gpu_dot_merger_threshold_mb=0,xla_gpu_enable_dynamic_slice_fusion=true

Each ``--variant=NAME:OVERRIDES`` is the step of ``configs/<config>.py`` (synthetic data, ``--dtype``, ``--remat``)
with ``--set`` and then its own config overrides (``benchmarks/common.py``'s ``split_overrides``; XLA options go in
``train.xla_gpu_options``, which each step compiles with on a GPU). All variants are built and compiled first, then
timed ``--rounds`` times in turn (every other round in reverse order), ``--steps`` steps each, every variant going
on from its own state: a drift of the GPU's clock or of a neighbour's load falls on every variant alike. A variant
that fails to build or compile gives a row with its error. Prints one row per variant: the median
ms/step over the rounds, images/s, and the median over rounds of its ratio to the first variant in the same round
(with the smallest and largest ratio), its compile seconds, its compiled program (the first 8 hex digits of the
SHA-256 of XLA's optimised HLO text, and its number of instructions: an option that leaves both as the first
variant's changed nothing) and its last loss. The variants share the device's
memory, so their peaks are not their own (``train_throughput.py`` gives those).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import add_overrides_flag, join_overrides, synthetic_setup  # benchmarks/common.py

from cab_jax.summary import markdown_table


@dataclasses.dataclass
class Variant:
    """One variant's step, its current state and the ms/step of each round."""

    name: str
    step: object  # the compiled train step
    state: object
    teacher: object
    batches: list
    compile_s: float = 0.0
    program: str = ""
    ms: list[float] = dataclasses.field(default_factory=list)
    loss: float = float("nan")

    def run(self, steps: int) -> float:
        """Seconds for ``steps`` steps from the current state (which it advances)."""
        import jax

        start = time.perf_counter()
        for i in range(steps):
            self.state, metrics = self.step(self.state, self.teacher, self.batches[i % len(self.batches)])
        jax.block_until_ready(metrics)
        self.loss = float(metrics["loss"])
        return time.perf_counter() - start


def parse_variant(text: str) -> tuple[str, str]:
    name, sep, overrides = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME:OVERRIDES (OVERRIDES may be empty), got {text!r}")
    return name, overrides


def build(args: argparse.Namespace, name: str, overrides: str) -> Variant:
    built, batches = synthetic_setup(args.config, args.dtype, args.batch_size, args.steps, args.remat, "cab",
                                     args.scan_impl, overrides=join_overrides(args.set, overrides))
    start = time.perf_counter()
    compiled = built.trainer.jit_train_step.lower(built.state, built.teacher_params, batches[0]).compile()
    compile_s = time.perf_counter() - start
    variant = Variant(name, compiled, built.state, built.teacher_params, batches, compile_s,
                      program(compiled.as_text()))
    variant.run(1)  # a first step outside the rounds (allocations, autotuning caches)
    return variant


def program(hlo: str) -> str:
    """``"<8 hex digits of the SHA-256 of hlo>, <instructions> instr"``."""
    instructions = sum(" = " in line for line in hlo.splitlines() if line.startswith("  "))
    return f"{hashlib.sha256(hlo.encode()).hexdigest()[:8]}, {instructions} instr"


def rows(variants: list[Variant], batch_size: int) -> list[dict]:
    import numpy as np

    first = np.asarray(variants[0].ms)
    out = []
    for v in variants:
        ratios = np.asarray(v.ms) / first
        ms = float(np.median(v.ms))
        out.append({"variant": v.name, "ms_per_step": round(ms, 2), "images_per_s": round(1e3 * batch_size / ms, 1),
                    f"/ {variants[0].name}": round(float(np.median(ratios)), 4),
                    "ratio min-max": f"{ratios.min():.4f}-{ratios.max():.4f}", "compile_s": round(v.compile_s, 1),
                    "program": v.program, "loss": round(v.loss, 5)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="vim_small")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--remat", default="true", choices=("true", "false"))
    parser.add_argument("--scan_impl", default="auto")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variant", type=parse_variant, action="append", required=True,
                        help="NAME:OVERRIDES, once per variant (at least two); the first is the reference")
    add_overrides_flag(parser, "student.depth=2,teacher.depth=1 (every variant)")
    args = parser.parse_args()
    args.remat = args.remat == "true"
    names = [name for name, _ in args.variant]
    if len(names) < 2 or len(set(names)) < len(names):
        parser.error(f"--variant: give at least two, with different names (got {names})")
    import jax

    variants, failed = [], []
    for name, overrides in args.variant:
        try:
            variants.append(build(args, name, overrides))
        except Exception as e:  # e.g. an XLA option this XLA does not know: the others still run
            failed.append({"variant": name, "error": f"{type(e).__name__}: {e}".splitlines()[0][:160]})
    for r in range(args.rounds if variants else 0):
        for v in variants[::-1] if r % 2 else variants:
            v.ms.append(1e3 * v.run(args.steps) / args.steps)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.config} {args.dtype}, remat "
          f"{args.remat}, batch {args.batch_size}, {args.rounds} rounds of {args.steps} steps, set: {args.set or '-'}")
    for name, overrides in args.variant:
        print(f"  {name}: {overrides or '(no overrides)'}")
    print(markdown_table(rows(variants, args.batch_size) + failed if variants else failed))


if __name__ == "__main__":
    main()
