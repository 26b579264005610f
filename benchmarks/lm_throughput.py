"""Language CAB throughput by sequence length: training tokens/s and generation tokens/s, student vs teacher.

    python benchmarks/lm_throughput.py --lengths=2048,8192 --tokens_per_step=16384 --gen_batch=8 --new_tokens=64

Model sizes come from ``configs/phi_mamba.py`` (Phi-1.5 teacher, 24-layer d_model 2048 Phi-Mamba), changed with
``--set=student.depth=4,teacher.depth=4`` style overrides; both models are random (synthetic tokens). Each
measurement runs in its own process so peak memory is its own.

- train: one optimizer step on device-resident batches of ``tokens_per_step`` tokens; mode ``vanilla`` is the
  student alone (CE), ``cab`` adds the frozen teacher's forward and the bridges (CE + 0.5 KL + 0.5 bridge),
  ``teacher`` trains the teacher itself (CE), for comparison.
  ``state_gib``: the train state (parameters, optimizer state) held on the first device, its share of it under
  ``--set=mesh.fsdp=N``; ``teacher_gib`` the same of the frozen teacher.
- generate: prefill a ``length``-token context, then greedy decoding of ``new_tokens`` tokens one at a time; the
  student keeps a fixed-size recurrent state, the teacher a KV cache of ``length + new_tokens`` positions.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from common import (  # benchmarks/common.py  # noqa: E402
    add_overrides_flag,
    apply_overrides,
    load_config,
    parse_args_or_measure,
    peak_gib,
    run_each,
    state_gib,
    time_train_steps,
)

from cab_jax.summary import markdown_table  # noqa: E402


def _config(dtype: str, overrides: str):
    c = load_config("phi_mamba")
    c.dtype, c.data.synthetic = dtype, True
    apply_overrides(c, overrides)
    return c


def measure_train(length: int, tokens_per_step: int, mode: str, dtype: str, steps: int, overrides: str) -> dict:
    import numpy as np

    from cab_jax import sharding, train

    c = _config(dtype, overrides)
    batch = max(1, tokens_per_step // length)
    c.task = "train_teacher" if mode == "teacher" else "distill"
    c.loss.mode, c.data.seq_len = "vanilla" if mode == "teacher" else mode, length
    c.student.init_from_attention = False  # random teacher: nothing to copy, and it costs a teacher in memory
    (c.teacher.train if mode == "teacher" else c.train).update(dict(batch_size=batch, steps=steps))
    mesh = sharding.make_mesh(c.mesh)
    built = train.create_trainer(c, mesh, train_size=batch * steps)
    rng = np.random.default_rng(0)
    batches = [sharding.global_batch({"tokens": rng.integers(0, c.data.vocab_size, (batch, length + 1), np.int32),
                                      "loss_mask": np.ones((batch, length), np.float32)}, mesh) for _ in range(2)]
    held, teacher_held = state_gib(built.state), state_gib(built.teacher_params)  # before the steps donate them
    compile_s, elapsed, metrics = time_train_steps(built, batches, steps)
    return {"part": "train", "mode": mode, "length": length, "batch": batch,
            "tokens_per_s": round(batch * length * steps / elapsed), "ms_per_step": round(1e3 * elapsed / steps, 1),
            "state_gib": held, "teacher_gib": teacher_held, "peak_gib": peak_gib(), "compile_s": round(compile_s, 1),
            "loss": round(float(metrics["loss"]), 3)}


def measure_generate(length: int, role: str, batch: int, new_tokens: int, dtype: str, overrides: str) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from cab_jax import domains
    from cab_jax.generate import Generator

    c = _config(dtype, overrides)
    domain = domains.for_config(c)
    model = (domain.build_teacher if role == "teacher" else domain.build_student)(nnx.Rngs(0))
    prompt = np.random.default_rng(0).integers(0, c.data.vocab_size, (batch, length)).astype(np.int32)
    generator = Generator(model)
    start = time.perf_counter()
    generator(prompt, 3)  # compiles prefill and step
    compile_s = time.perf_counter() - start
    _, rate = generator(prompt, new_tokens)
    cache = model.init_cache(batch, length + new_tokens)
    cache_mib = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) / 2**20
    return {"part": "generate", "mode": role, "length": length, "batch": batch, "tokens_per_s": round(rate, 1),
            "ms_per_step": round(1e3 * batch / rate, 2), "cache_mib": round(cache_mib, 1), "peak_gib": peak_gib(),
            "compile_s": round(compile_s, 1)}


def measure(kind: str, **job) -> dict:
    return (measure_train if kind == "train" else measure_generate)(**job)


def _error_row(job: dict) -> dict:
    return {"part": job["kind"], "mode": job.get("mode", job.get("role")), "length": job["length"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--parts", default="train,generate")
    parser.add_argument("--modes", default="vanilla,cab")
    parser.add_argument("--tokens_per_step", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gen_batch", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    add_overrides_flag(parser, "student.depth=4,teacher.depth=4")
    args = parse_args_or_measure(parser, measure)
    if args is None:
        return
    import jax

    rows = []
    for length in map(int, args.lengths.split(",")):
        jobs = []
        if "train" in args.parts:
            jobs += [dict(kind="train", length=length, tokens_per_step=args.tokens_per_step, mode=m, dtype=args.dtype,
                          steps=args.steps, overrides=args.set) for m in args.modes.split(",")]
        if "generate" in args.parts:
            jobs += [dict(kind="generate", length=length, role=r, batch=args.gen_batch, new_tokens=args.new_tokens,
                          dtype=args.dtype, overrides=args.set) for r in ("student", "teacher")]
        rows += run_each(__file__, jobs, _error_row)
    columns = ["part", "mode", "length", "batch", "tokens_per_s", "ms_per_step", "state_gib", "teacher_gib", "peak_gib",
               "cache_mib", "compile_s", "loss", "error"]
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, dtype {args.dtype}, set: {args.set or '-'}")
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
