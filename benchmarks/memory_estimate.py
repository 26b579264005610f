"""The per-chip memory estimate (``cab_jax/memory_plan.py``) against XLA's compiled memory analysis of the same
train step on this machine's first device, and the device's peak after a few steps.

    python benchmarks/memory_estimate.py --configs=vim_tiny,vim_small --dtypes=float32,bfloat16 --batch_size=128

Each row is one process (so the peak is its own). ``estimate GiB`` is the estimator's total; ``xla GiB`` XLA's
arguments + outputs - aliases + temporaries for the compiled step (``train.step_memory_bytes``); ``peak GiB`` the
device's ``peak_bytes_in_use`` after 3 steps (on an accelerator; the CPU says 0 and runs no step). On CPU the scan runs
as XLA's associative scan, a different program from the GPU's and TPU's kernels: compare on an accelerator.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import (  # benchmarks/common.py
    add_overrides_flag,
    parse_args_or_measure,
    peak_gib,
    run_each,
    synthetic_setup,
)

from cab_jax.summary import markdown_table


def measure(config_name: str, dtype: str, batch_size: int, remat: bool, overrides: str = "") -> dict:
    import jax

    from cab_jax import memory_plan, train

    built, batches = synthetic_setup(config_name, dtype, batch_size, 3, remat, "cab", "auto", overrides=overrides)
    c, mesh = built.trainer.c, built.trainer.mesh
    estimate = memory_plan.estimate(c, mesh, memory_plan.activations(c, jax.devices()[0]))
    step = built.trainer.jit_train_step
    compiled = step.lower(built.state, built.teacher_params, batches[0]).compile()
    if jax.default_backend() != "cpu":  # the CPU reports no peak: no steps run there
        state = built.state
        for i in range(3):
            state, metrics = step(state, built.teacher_params, batches[i % 2])
        jax.block_until_ready(metrics)
    return {"config": config_name, "dtype": dtype, "remat": remat, "batch": batch_size,
            "estimate GiB": round(estimate.total / 2**30, 2),
            "of which activations": round((estimate.total - estimate.state - estimate.teacher - estimate.gradients)
                                          / 2**30, 2),
            "xla GiB": round(train.step_memory_bytes(compiled) / 2**30, 2), "peak GiB": peak_gib(),
            "device": jax.devices()[0].device_kind}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="vim_tiny,vim_small")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--remat", default="true")
    parser.add_argument("--batch_size", type=int, default=128)
    add_overrides_flag(parser)
    args = parse_args_or_measure(parser, measure)
    if args is None:
        return
    grid = itertools.product(args.configs.split(","), args.dtypes.split(","), args.remat.split(","))
    jobs = (dict(config_name=config_name, dtype=dtype, batch_size=args.batch_size, remat=remat == "true",
                 overrides=args.set)
            for config_name, dtype, remat in grid)
    rows = run_each(__file__, jobs, lambda job: job)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
