"""Collect the final top-1 / top-5 of distillation runs into one Markdown table (used by launch/sweep_subsets.sh).

    python launch/collect_results.py RUN_OR_ROOT [RUN_OR_ROOT ...] [--out=FILE.md]

A path holding ``metrics.jsonl`` or ``run_config.json`` is one run; any other directory stands for the runs one
level below it. Per run: the subset fraction and loss mode from ``run_config.json`` (written when the run starts;
else from a sweep directory name such as ``s10_cab``), and the final evaluation from ``results.json`` (written when
the run finishes). A run that has not finished shows its latest periodic evaluation (the last ``metrics.jsonl``
line whose split is "eval"), so the table gives each row's step. A run with no evaluation yet is listed with
dashes. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

MODES = ("vanilla", "soft", "cab")
COLUMNS = ("subset", "mode", "top-1", "top-5", "step", "run")


def is_run(path: pathlib.Path) -> bool:
    return (path / "metrics.jsonl").exists() or (path / "run_config.json").exists()


def run_dirs(paths: list[pathlib.Path]) -> list[pathlib.Path]:
    """The runs that ``paths`` name: each path that is a run (or does not exist yet), else its subdirectories."""
    runs = []
    for path in paths:
        if is_run(path) or not path.is_dir():
            runs.append(path)
        else:
            runs += sorted(p for p in path.iterdir() if p.is_dir() and is_run(p))
    return runs


def row(run: pathlib.Path) -> dict:
    """One table row for the run in ``run`` (subset as a fraction, mode, the final or latest top1/top5/step)."""
    subset, mode = None, None
    if (run / "run_config.json").exists():
        config = json.loads((run / "run_config.json").read_text())["config"]
        subset, mode = config["data"].get("subset_fraction"), config["loss"].get("mode")
    elif name := re.fullmatch(r"s(\d+)_(\w+)", run.name):
        subset, mode = int(name.group(1)) / 100, name.group(2)
    last_eval = {}
    if (run / "results.json").exists():
        final = json.loads((run / "results.json").read_text())
        last_eval = {**final["metrics"], "step": final["step"]}
    elif (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            if line.strip() and (record := json.loads(line)).get("split") == "eval":
                last_eval = record
    return {"subset": subset, "mode": mode, "top-1": last_eval.get("top1"), "top-5": last_eval.get("top5"),
            "step": last_eval.get("step"), "run": str(run)}


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    if column == "subset":
        return f"{100 * value:g} %"
    if column in ("top-1", "top-5"):
        return f"{value:.2f}"
    return str(value)


def table(rows: list[dict]) -> str:
    """Markdown, rows by subset then mode (vanilla, soft, cab, then any other)."""
    order = lambda r: (r["subset"] if r["subset"] is not None else 2.0,
                       MODES.index(r["mode"]) if r["mode"] in MODES else len(MODES), str(r["mode"]))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(c, r[c]) for c in COLUMNS) + " |" for r in sorted(rows, key=order)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=pathlib.Path, help="run directories, or directories of runs")
    parser.add_argument("--out", type=pathlib.Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    text = table([row(run) for run in run_dirs(args.paths)])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
