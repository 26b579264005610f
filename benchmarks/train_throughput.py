"""Distillation train-step throughput and peak device memory on synthetic data.

    python benchmarks/train_throughput.py --configs=vim_tiny,vim_small --dtypes=float32,bfloat16 \
        --batch_size=64 --steps=200 --remat=false,true --scan_impls=associative,pallas

Each (config, dtype, remat) combination runs in its own process so peak memory is its own. The step is the
full CAB step (teacher forward, student forward/backward, bridge, AdamW update) on device-resident batches:
it measures the model, not the input pipeline. Prints a Markdown table; ``peak_gib`` is the device's peak (0 where
the backend does not say, as on CPU), ``xla_step_gib`` XLA's estimate for the compiled step (arguments, outputs,
temporaries). ``mfu``: model FLOPs per step (``common.model_flops``: teacher forward + 3 x student forward) over the
step time and the devices' matmul rate in the step's dtype (one device's, measured in the same process by
``common.matmul_flops_per_s`` and given as ``matmul_tflops``, times the number of devices).
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import (  # benchmarks/common.py
    add_overrides_flag,
    matmul_flops_per_s,
    model_flops,
    parse_args_or_measure,
    peak_gib,
    run_each,
    run_one,
    synthetic_setup,
    time_train_steps,
)

from cab_jax.summary import markdown_table


def measure(config_name: str, dtype: str, batch_size: int, steps: int, remat: bool, mode: str,
            scan_impl: str, remat_policy: str = "full", overrides: str = "") -> dict:
    import jax

    from cab_jax import train

    built, batches = synthetic_setup(config_name, dtype, batch_size, steps, remat, mode, scan_impl, remat_policy,
                                      overrides=overrides)
    compile_s, elapsed, metrics = time_train_steps(built, batches, steps, warmup=3)
    compiled = built.trainer.jit_train_step.lower(built.state, built.teacher_params, batches[0]).compile()
    flops, rate = model_flops(built, batches[0]), matmul_flops_per_s(dtype)
    step_s = elapsed / steps
    return {"config": config_name, "dtype": dtype, "remat": remat, "remat_policy": remat_policy, "mode": mode,
            "scan_impl": scan_impl,
            "batch": batch_size,
            "images_per_s": round(batch_size * steps / elapsed, 1), "ms_per_step": round(1e3 * elapsed / steps, 2),
            "compile_s": round(compile_s, 1), "peak_gib": peak_gib(),
            "xla_step_gib": round(train.step_memory_bytes(compiled) / 2**30, 3),
            "loss": round(float(metrics["loss"]), 4), "model_gflop": round(flops / 1e9, 1),
            "matmul_tflops": round(rate / 1e12, 1), "mfu": round(flops / step_s / (rate * jax.device_count()), 3),
            "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def _error_row(job: dict) -> dict:
    return {**job, "config": job["config_name"], "batch": job["batch_size"]}


def _run_one(job: dict) -> dict:
    return run_one(__file__, job, _error_row(job))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="vim_tiny,vim_small")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--remat", default="false,true")
    parser.add_argument("--modes", default="cab")
    parser.add_argument("--scan_impls", default="auto")
    parser.add_argument("--remat_policies", default="full", help="student.remat_policy values (with remat)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    add_overrides_flag(parser)
    args = parse_args_or_measure(parser, measure)
    if args is None:
        return
    grid = itertools.product(*(getattr(args, name).split(",") for name in ("configs", "dtypes", "remat", "modes",
                                                                          "scan_impls")))
    jobs = (dict(config_name=config_name, dtype=dtype, batch_size=args.batch_size, steps=args.steps,
                 remat=remat == "true", mode=mode, scan_impl=scan_impl, remat_policy=policy, overrides=args.set)
            for config_name, dtype, remat, mode, scan_impl in grid
            for policy in (args.remat_policies.split(",") if remat == "true" else ["full"]))
    rows = run_each(__file__, jobs, _error_row)
    columns = ["config", "dtype", "remat", "remat_policy", "mode", "scan_impl", "batch", "images_per_s", "ms_per_step",
               "peak_gib", "xla_step_gib", "compile_s", "loss", "model_gflop", "matmul_tflops", "mfu", "device",
               "jax", "error"]
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
