"""Is training input-bound? Images/s through ``python -m cab_jax.main`` on the fake ImageNet against the train step
alone on device-resident batches (benchmarks/train_throughput.py's measurement), at the same batch, dtype and
model, in one invocation.

    python benchmarks/input_bound.py --data_dir=/tmp/fake_imagenet --config=vim_small --dtype=bfloat16 \
        --batch_size=128 --remat=false --steps=80 --num_workers=14

The run through ``main`` distills from a random teacher saved first and reads, decodes and augments the JPEGs with
the whole recipe in ``--num_workers`` grain processes. Reported for it: the median images/s and data wait (ms per
step) over the logged intervals after the first ``--skip`` (compilation and warm-up). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from common import load_config, save_random_teacher  # noqa: E402  # benchmarks/common.py
from train_throughput import _run_one  # noqa: E402

from cab_jax.summary import markdown_table  # noqa: E402


def run(args, overrides: list[str], workdir: pathlib.Path) -> dict:
    command = [sys.executable, "-m", "cab_jax.main", f"--config={ROOT / 'configs' / (args.config + '.py')}",
               f"--workdir={workdir}", f"--config.dtype={args.dtype}", f"--config.student.remat={args.remat}",
               f"--config.train.batch_size={args.batch_size}", f"--config.train.steps={args.steps}",
               f"--config.train.log_every={args.log_every}", f"--config.train.checkpoint_every={10 * args.steps}",
               f"--config.data.num_workers={args.num_workers}", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)}\nfailed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"][args.skip:]
    return {"images/s": round(statistics.median(r["images_per_s"] for r in train)),
            "data wait ms/step": round(statistics.median(r["data_wait_ms"] for r in train), 1),
            "intervals": len(train)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="holding imagenet2012 (the fake one or the real one)")
    parser.add_argument("--config", default="vim_small")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--remat", default="false")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--skip", type=int, default=2, help="logged intervals left out (compilation, warm-up)")
    parser.add_argument("--num_workers", type=int, default=14)
    args = parser.parse_args()
    step = _run_one(dict(config_name=args.config, dtype=args.dtype, batch_size=args.batch_size, steps=50,
                         remat=args.remat == "true", mode="cab", scan_impl="auto"))
    rows = [{"data": "device-resident batches (the step alone)", "images/s": step.get("images_per_s", step)}]
    print(rows[-1], flush=True)
    # This process builds the random teacher on the CPU: on the GPU, JAX would hold most of its memory while the
    # run through main (a subprocess, with the environment less this setting) needs it.
    os.environ["JAX_PLATFORMS"] = "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        teacher = pathlib.Path(tmp) / "teacher"
        save_random_teacher(load_config(args.config), teacher)
        overrides = [f"--config.teacher.init_from={teacher}", f"--config.data.data_dir={args.data_dir}"]
        rows.append({"data": "fake ImageNet through main", **run(args, overrides, pathlib.Path(tmp) / "run")})
        print(rows[-1], flush=True)
    print(f"\n{args.config}, {args.dtype}, remat {args.remat}, batch {args.batch_size}, {args.num_workers} workers:\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
