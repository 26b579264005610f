"""The demo task: train a teacher on the embedded dataset, distil one student per loss mode on a small
per-class subset, evaluate each on the full test split and print a results table."""

from __future__ import annotations

import dataclasses
import json

import ml_collections
from absl import logging
from etils import epath

from cab_jax import train

COLUMNS = ("model", "mode", "train images", "top-1", "top-5", "steps", "wall time (s)")


def run(c: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Teacher in ``workdir/teacher`` (reused when finished), students in ``workdir/students/MODE``."""
    root = epath.Path(workdir)
    if not c.data.data_dir:  # the embedded dataset is built inside the workdir unless told otherwise
        c = ml_collections.ConfigDict(c.to_dict())
        c.data.data_dir = str(root / "tfds")
    teacher_dir = root / "teacher"
    logging.info("Demo stage 1: teacher on the full train split (cached in %s).", teacher_dir)
    teacher = train.run(c, str(teacher_dir), role="teacher")
    rows = [_row("teacher (DeiT)", "supervised", teacher)]
    if teacher.stopped_early:
        return rows
    for mode in c.demo.modes:
        logging.info("Demo stage 2: student with loss mode %r on %.0f%% of the train split.", mode,
                     100 * c.data.subset_fraction)
        sc = ml_collections.ConfigDict(c.to_dict())
        sc.loss.mode = mode
        sc.teacher.init_from = str(teacher_dir)
        result = train.run(sc, str(root / "students" / mode), role="student")
        rows.append(_row("student (Vim)", mode, result))
        if result.stopped_early:
            break
    table = format_table(rows)
    print(table, flush=True)
    (root / "results.md").write_text(table + "\n")
    (root / "results.json").write_text(json.dumps(rows, indent=2))
    return rows


def _row(model: str, mode: str, result: train.RunResult) -> dict:
    r = dataclasses.asdict(result)
    return {"model": model, "mode": mode, "train images": r["train_examples"], "top-1": round(r["top1"], 2),
            "top-5": round(r["top5"], 2), "steps": r["steps"], "wall time (s)": round(r["wall_time_s"], 1)}


def format_table(rows: list[dict]) -> str:
    """A Markdown table, one line per row."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[col]) for col in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)
