"""The train step's loss trajectory in several dtypes (or scan implementations) on the same data: does a faster step
train the same way?

    python benchmarks/loss_trajectory.py --config=vim_small --dtypes=float32,bfloat16 --steps=200 --out=traj.json \
        [--plot=traj.png]
    python benchmarks/loss_trajectory.py --replot=traj.json --plot=traj.png      # draw a saved run (needs matplotlib)
    python benchmarks/loss_trajectory.py --replot=one_gpu.json,two_gpus.json     # runs saved apart, side by side

Each run (one per dtype and scan implementation, in its own process) starts from the same initialisation and
cycles through the same ``--batches`` synthetic batches (random images and labels: the student fits the teacher's
outputs and, with the bridge, its attention maps, so the terms fall), and records every scalar metric at every step.
Prints, per metric, each run's value at a few steps and its largest deviation from the first run relative to the
first run's value; ``--out`` keeps the whole trajectories as JSON, ``--plot`` draws them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import add_overrides_flag, parse_args_or_measure, run_each, synthetic_setup  # benchmarks/common.py

from cab_jax.summary import markdown_table

SKIPPED = ("lr", "nonfinite")  # schedule and guard flags, the same in every run


def measure(config_name: str, dtype: str, scan_impl: str, batch_size: int, steps: int, batches: int,
            overrides: str = "") -> dict:
    import jax

    built, data = synthetic_setup(config_name, dtype, batch_size, steps, True, "cab", scan_impl,
                                  num_batches=batches, overrides=overrides)
    state, step = built.state, built.trainer.jit_train_step
    history = []
    for i in range(steps):
        state, metrics = step(state, built.teacher_params, data[i % batches])
        history.append(metrics)
    history = jax.device_get(history)
    names = [k for k, v in history[0].items() if k not in SKIPPED and getattr(v, "ndim", 1) == 0]
    return {"run": f"{dtype} {scan_impl}", "config": config_name, "batch": batch_size,
            "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "metrics": {k: [float(m[k]) for m in history] for k in names}}


def saved_runs(paths: list[str]) -> list[dict]:
    """The runs of ``--out`` files, in order; from several files each run's name starts with its file's stem."""
    runs = []
    for path in map(pathlib.Path, paths):
        for run in json.loads(path.read_text()):
            runs.append({**run, "run": f"{path.stem}: {run['run']}"} if len(paths) > 1 else run)
    return runs


def summary_rows(runs: list[dict], at: list[int]) -> list[dict]:
    """Per metric and run: the values at steps ``at`` (1-based) and the largest |value - first run's| over all steps
    relative to the first run's |value| at that step."""
    base = runs[0]["metrics"]
    rows = []
    for name in base:
        for run in runs:
            values = run["metrics"][name]
            dev = max(abs(v - b) / max(abs(b), 1e-12) for v, b in zip(values, base[name], strict=True))
            rows.append({"metric": name, "run": run["run"],
                         **{f"step {s}": f"{values[s - 1]:.4g}" for s in at if 1 <= s <= len(values)},
                         "max rel. deviation": f"{dev:.2%}"})
    return rows


def plot(runs: list[dict], path: str) -> None:
    from etils import epath

    from cab_jax import plots

    names = list(runs[0]["metrics"])
    fig = plots.new_figure("loss trajectory plot", figsize=(4 * len(names), 3.2))
    if fig is None:
        return
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        for run in runs:
            ax.plot(range(1, len(run["metrics"][name]) + 1), run["metrics"][name], label=run["run"], linewidth=1)
        ax.set(title=name, xlabel="step", yscale="log" if min(runs[0]["metrics"][name]) > 0 else "linear")
    fig.axes[0].legend()
    fig.suptitle(f"{runs[0]['config']}, batch {runs[0]['batch']}, {runs[0]['device']}")
    plots.save_png(fig, epath.Path(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="vim_small")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--scan_impls", default="auto")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batches", type=int, default=8, help="distinct synthetic batches, cycled")
    add_overrides_flag(parser)
    parser.add_argument("--out", help="write the trajectories here (JSON)")
    parser.add_argument("--plot", help="draw them here (PNG, needs matplotlib)")
    parser.add_argument("--replot", help="saved --out files (comma-separated): only summarise them (against the "
                        "first file's first run) and draw them (with --plot)")
    args = parse_args_or_measure(parser, measure)
    if args is None:
        return
    if args.replot:
        runs = saved_runs(args.replot.split(","))
    else:
        jobs = (dict(config_name=args.config, dtype=dtype, scan_impl=impl, batch_size=args.batch_size,
                     steps=args.steps, batches=args.batches, overrides=args.set)
                for dtype, impl in itertools.product(args.dtypes.split(","), args.scan_impls.split(",")))
        runs = run_each(__file__, jobs, lambda job: {"run": f"{job['dtype']} {job['scan_impl']}"})
        if failed := [r for r in runs if "error" in r]:
            sys.exit(f"loss_trajectory.py: {len(failed)} run(s) failed: {failed}")
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(runs))
    steps = len(next(iter(runs[0]["metrics"].values())))
    print(markdown_table(summary_rows(runs, sorted({1, 10, steps // 4, steps // 2, steps}))))
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
