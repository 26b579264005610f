"""The study runner (``config.task = "study"``): train the teacher once, then one student per loss mode of
``config.study.modes``, evaluate each on the held-out split and write a results table.

Vision (``configs/demo.py``): DeiT teacher, Vim students on a small per-class subset, top-1/top-5.
Language (``configs/demo_lm.py``): Phi teacher, Phi-Mamba students, held-out perplexity and tokens/s; the modes in
``config.study.init_from_attention_modes`` start from the teacher's attention.
"""

from __future__ import annotations

import json
import statistics

import ml_collections
from absl import logging
from etils import epath

from cab_jax import config as config_lib
from cab_jax import train

VISION_COLUMNS = ("model", "mode", "train images", "top-1", "top-5", "steps", "this run", "wall time (s)")
LANGUAGE_COLUMNS = ("model", "mode", "init from attention", "train tokens", "held-out perplexity", "token acc (%)",
                    "train tokens/s", "steps", "this run", "wall time (s)")


def _stage(c: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
    """A copy of ``c`` for one stage of the study, with dotted-key ``changes`` (e.g. ``{"loss.mode": "soft"}``)."""
    stage = ml_collections.ConfigDict(c.to_dict())
    for key, value in changes.items():
        section, name = key.rsplit(".", 1) if "." in key else ("", key)
        (stage[section] if section else stage)[name] = value
    return stage


def run(c: ml_collections.ConfigDict, workdir: str) -> tuple[list[dict], bool]:
    """Teacher in ``workdir/teacher`` (reused when finished), students in ``workdir/students/MODE``; the table in
    ``workdir/results.md`` and ``results.json``. Returns the rows and whether the study finished (False: a stage
    was stopped by a signal, and the same command resumes it)."""
    config_lib.validate(c)
    root = epath.Path(workdir)
    # The embedded datasets are built inside the workdir unless told otherwise.
    data_dir = c.data.data_dir or str(root / "tfds")
    language = c.domain == "language"
    teacher_dir = root / "teacher"
    logging.info("Study stage 1: teacher on the full train split (cached in %s).", teacher_dir)
    teacher = train.train_and_evaluate(_stage(c, task="train_teacher", **{"data.data_dir": data_dir}), str(teacher_dir))
    rows = [_row(c, "teacher (Phi)" if language else "teacher (DeiT)", "supervised", False, teacher, teacher_dir)]
    if teacher.stopped_early:
        return rows, False
    for mode in c.study.modes:
        changes = {"task": "distill", "loss.mode": mode, "teacher.init_from": str(teacher_dir),
                   "data.data_dir": data_dir}
        init = language and mode in c.study.init_from_attention_modes
        if language:
            changes["student.init_from_attention"] = init
        logging.info("Study stage 2: student with loss mode %r%s.", mode,
                     " initialised from the teacher's attention" if init else
                     "" if language else f" on {100 * c.data.subset_fraction:.0f}% of the train split")
        student_dir = root / "students" / mode
        result = train.train_and_evaluate(_stage(c, **changes), str(student_dir))
        rows.append(_row(c, "student (Phi-Mamba)" if language else "student (Vim)", mode, init, result, student_dir))
        if result.stopped_early:
            return rows, False
    table = format_table(rows, LANGUAGE_COLUMNS if language else VISION_COLUMNS)
    print(table, flush=True)
    (root / "results.md").write_text(table + "\n")
    (root / "results.json").write_text(json.dumps(rows, indent=2))
    return rows, True


def _row(c: ml_collections.ConfigDict, model: str, mode: str, init: bool, result: train.RunResult,
         workdir: epath.Path) -> dict:
    m, nan = result.metrics, float("nan")
    row = {"model": model, "mode": mode, "steps": result.steps, "this run": _this_run(result),
           "wall time (s)": round(result.wall_time_s, 1)}
    if c.domain != "language":
        return {**row, "train images": result.train_examples, "top-1": round(m.get("top1", nan), 2),
                "top-5": round(m.get("top5", nan), 2)}
    return {**row, "init from attention": "yes" if init else "no",
            "train tokens": result.train_examples * c.data.seq_len,
            "held-out perplexity": round(m.get("perplexity", nan), 2),
            "token acc (%)": round(m.get("token_acc", nan), 2),
            "train tokens/s": round(_steady_tokens_per_s(workdir), 1)}


def _this_run(result: train.RunResult) -> str:
    """What this invocation did for a row: trained it, resumed it, or reused one finished earlier."""
    if result.resumed_at is None:
        return "trained"
    if result.resumed_at >= result.steps:
        return "reused"
    return f"resumed at step {result.resumed_at}"


def _steady_tokens_per_s(workdir: epath.Path) -> float:
    """Median training tokens/s over the logged intervals, leaving out the first (it includes compilation)."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return float("nan")
    rates = [r["tokens_per_s"] for r in map(json.loads, path.read_text().splitlines())
             if r["split"] == "train" and "tokens_per_s" in r]
    return statistics.median(rates[1:] or rates) if rates else float("nan")


def format_table(rows: list[dict], columns: tuple[str, ...] = VISION_COLUMNS) -> str:
    """A Markdown table, one line per row."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[col]) for col in columns) + " |" for row in rows]
    return "\n".join(lines)
