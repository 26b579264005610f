"""The study runner (``config.task = "study"``): train the teacher once, then one student per cell of the grid
``config.study.fractions`` (vision: train-subset fractions) x ``config.study.modes`` (each mode of
``config.study.variant_modes`` once per entry of ``config.study.variants``: ablations) x ``config.study.seeds``,
evaluate each on the held-out split and write the tables: ``results.md``/``.json`` (one row per run) and
``study.md``/``.json`` (per fraction, mode and variant: mean, standard deviation and every seed's figure, and the
bridge's parameter count), and, with matplotlib installed (the ``plot`` extra), ``study.png`` (the figure against
the fraction, one line per mode and variant).
A finished run is reused, not trained again, so the same command resumes a study.

Vision (``configs/demo.py``): DeiT teacher, Vim students on a small per-class subset, top-1/top-5.
Language (``configs/demo_lm.py``): Phi teacher, Phi-Mamba students, held-out perplexity and tokens/s; the modes in
``config.study.init_from_attention_modes`` start from the teacher's attention.
"""

from __future__ import annotations

import ast
import json
import re
import statistics
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath
from flax import nnx

from cab_jax import config as config_lib
from cab_jax import domains, plots, train
from cab_jax.errors import ConfigError
from cab_jax.summary import markdown_table

VISION_COLUMNS = ("model", "mode", "variant", "bridge params", "fraction", "seed", "train images", "top-1", "top-5",
                  "steps", "this run", "wall time (s)")
LANGUAGE_COLUMNS = ("model", "mode", "variant", "bridge params", "seed", "init from attention", "train tokens",
                    "held-out perplexity", "token acc (%)", "train tokens/s", "steps", "this run", "wall time (s)")
SUMMARY_COLUMNS = ("fraction", "mode", "variant", "bridge params", "metric", "mean", "std", "seeds", "per seed")
NO_VARIANT = "-"


def _stage(c: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
    """A copy of ``c`` for one stage of the study, with dotted-key ``changes`` (e.g. ``{"loss.mode": "soft"}``)."""
    stage = ml_collections.ConfigDict(c.to_dict())
    for key, value in changes.items():
        section, name = key.rsplit(".", 1) if "." in key else ("", key)
        (stage[section] if section else stage)[name] = value
    return stage


# What the study itself sets per run (or once, for the teacher): a variant may not change it.
STUDY_FIELDS = ("task", "seed", "loss.mode", "data.data_dir", "data.subset_fraction", "student.init_from_attention")


def variants(c: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    """``config.study.variants`` by name: each entry is ``"NAME: field=value; field=value"`` (dotted fields of the
    config; values read as Python literals, else as strings), e.g. ``"mlp2: bridge.hidden_layers=2"``. Names are
    directory names (letters, digits, ``_ . -``); the fields the study sets (``STUDY_FIELDS``) and the teacher's
    (trained once for all runs) are refused."""
    out = {}
    entries = tuple(c.study.get("variants", ()))
    if entries and not set(c.study.modes) & set(c.study.get("variant_modes", ("cab",))):
        raise ConfigError("config.study.variants: no mode of study.modes is in study.variant_modes, so no run would "
                          "try them")
    for entry in entries:
        name, sep, body = entry.partition(":")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) or name in out:
            raise ConfigError(f"config.study.variants: {entry!r} must read 'NAME: field=value; ...' with a new name "
                              "of letters, digits, '_', '.' and '-'")
        changes = {}
        for item in filter(None, (part.strip() for part in body.split(";"))):
            key, sep, text = (part.strip() for part in item.partition("="))
            section, _, field = key.rpartition(".")
            try:
                known = field in (c[section] if section else c)
            except (KeyError, TypeError):  # no such section, or a section that is a value
                known = False
            if not sep or not known:
                raise ConfigError(f"config.study.variants: {item!r} of {name!r} does not set a field of the config")
            if key in STUDY_FIELDS or key.startswith("teacher."):
                raise ConfigError(f"config.study.variants: {item!r} of {name!r} sets a field the study sets itself "
                                  "(or the teacher's, trained once for every run)")
            try:
                changes[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                changes[key] = text
        out[name] = changes
    return out


def grid(c: ml_collections.ConfigDict) -> list[tuple[float | None, str, str, int]]:
    """The students of a study, in training order: (train-subset fraction (None for language), mode, variant,
    seed). Unset fractions or seeds mean the config's own ``data.subset_fraction`` and ``seed``; the variants of
    ``study.variants`` are tried with the modes of ``study.variant_modes`` (default: cab), the other modes run
    once (variant ``NO_VARIANT``)."""
    fractions = [None] if c.domain == "language" else list(c.study.get("fractions", ())) or [c.data.subset_fraction]
    seeds = list(c.study.get("seeds", ())) or [c.seed]
    names = list(variants(c)) or [NO_VARIANT]
    runs = [(mode, v) for mode in c.study.modes
            for v in (names if mode in c.study.get("variant_modes", ("cab",)) else [NO_VARIANT])]
    return [(f, mode, v, seed) for f in fractions for mode, v in runs for seed in seeds]


def bridge_params(c: ml_collections.ConfigDict) -> int:
    """The number of bridge parameters a student of ``c`` trains (0 without a bridge term)."""
    job = domains.for_config(c).job()
    if job.bridge is None:
        return 0
    return sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: job.bridge(nnx.Rngs(0))))))


def run(c: ml_collections.ConfigDict, workdir: str) -> tuple[list[dict], bool]:
    """Teacher in ``workdir/teacher`` (reused when finished), students in ``workdir/students/MODE/...``; the tables
    as the module says. Returns the rows and whether the study finished (False: a stage was stopped by a signal,
    and the same command resumes it)."""
    config_lib.validate(c)
    cells, variant_changes = grid(c), variants(c)
    for changes in variant_changes.values():  # a bad variant fails now, not after the teacher trained
        config_lib.validate(_stage(c, **changes))
    root = epath.Path(workdir)
    _cache_compiled_programs(root)
    # The embedded datasets are built inside the workdir unless told otherwise.
    data_dir = c.data.data_dir or str(root / "tfds")
    language = c.domain == "language"
    teacher_dir = root / "teacher"
    logging.info("Study stage 1: teacher on the full train split (cached in %s).", teacher_dir)
    teacher = train.train_and_evaluate(_stage(c, task="train_teacher", **{"data.data_dir": data_dir}), str(teacher_dir))
    rows = [_row(c, "teacher (Phi)" if language else "teacher (DeiT)", "supervised", None, c.seed, False, teacher,
                 teacher_dir, NO_VARIANT, 0)]
    if teacher.stopped_early:
        return rows, False
    for number, (fraction, mode, variant, seed) in enumerate(cells, 1):
        changes = {**variant_changes.get(variant, {}), "task": "distill", "loss.mode": mode,
                   "teacher.init_from": str(teacher_dir), "data.data_dir": data_dir, "seed": seed}
        init = language and mode in c.study.init_from_attention_modes
        if language:
            changes["student.init_from_attention"] = init
        else:
            changes["data.subset_fraction"] = fraction
        logging.info("Study stage 2 (%d/%d): student with loss mode %r%s, seed %d%s.", number, len(cells), mode,
                     "" if variant == NO_VARIANT else f" ({variant})", seed,
                     " initialised from the teacher's attention" if init else
                     "" if language else f", on {100 * fraction:g}% of the train split")
        student_dir = root / "students" / mode / ("" if variant == NO_VARIANT else variant) / (
            f"seed{seed}" if language else f"fraction{fraction:g}_seed{seed}")
        stage = _stage(c, **changes)
        result = train.train_and_evaluate(stage, str(student_dir))
        rows.append(_row(c, "student (Phi-Mamba)" if language else "student (Vim)", mode, fraction, seed, init,
                         result, student_dir, variant, bridge_params(stage)))
        if result.stopped_early:
            return rows, False
    table = markdown_table(rows, LANGUAGE_COLUMNS if language else VISION_COLUMNS)
    print(table, flush=True)
    (root / "results.md").write_text(table + "\n")
    (root / "results.json").write_text(json.dumps(rows, indent=2))
    cells = summarize(rows[1:], "held-out perplexity" if language else "top-1")
    (root / "study.md").write_text(markdown_table(cells, SUMMARY_COLUMNS) + "\n")
    (root / "study.json").write_text(json.dumps(cells, indent=2))
    if not language:
        plot(cells, root / "study.png")
    return rows, True


def _cache_compiled_programs(root: epath.Path) -> None:
    """The study's students share their programs (every seed of a fraction and mode compiles the same ones):
    unless a compilation cache is set already, JAX's persistent cache goes to ``root/jax_cache``, so that each
    program compiles once per study (and once in all when the study is resumed)."""
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(root / "jax_cache"))
        logging.info("Compiled programs are cached in %s.", root / "jax_cache")


def summarize(rows: list[dict], metric: str) -> list[dict]:
    """Per (fraction, mode, variant) of the student ``rows``, in their order: ``metric``'s mean, sample standard
    deviation (0 for one seed) and every seed's figure."""
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row.get("fraction"), row["mode"], row["variant"], row["bridge params"]), []).append(row)
    summary = []
    for (fraction, mode, variant, n_bridge), runs in cells.items():
        values = [r[metric] for r in runs]
        summary.append({"fraction": fraction, "mode": mode, "variant": variant, "bridge params": n_bridge,
                        "metric": metric,
                        "mean": round(statistics.fmean(values), 3),
                        "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
                        "seeds": [r["seed"] for r in runs], "per seed": values})
    return summary


def plot(cells: list[dict], path: epath.Path) -> bool:
    """The summary ``cells`` as Fig. 2 of the paper draws them: the metric against the train fraction (log scale),
    one line per mode with standard-deviation error bars, written to ``path`` (PNG). Needs matplotlib (the ``plot``
    extra); without it, says so and returns False."""
    fig = plots.new_figure("study plot", figsize=(5, 3.5))
    if fig is None:
        return False
    ax = fig.subplots()
    for mode, variant in dict.fromkeys((cell["mode"], cell.get("variant", NO_VARIANT)) for cell in cells):
        mine = sorted((c for c in cells if (c["mode"], c.get("variant", NO_VARIANT)) == (mode, variant)),
                      key=lambda c: c["fraction"])
        ax.errorbar([100 * c["fraction"] for c in mine], [c["mean"] for c in mine], yerr=[c["std"] for c in mine],
                    marker="o", capsize=3, label=mode if variant == NO_VARIANT else f"{mode} ({variant})")
    ax.set_xscale("log")
    ax.set_xlabel("train images used (%)")
    ax.set_ylabel(f"{cells[0]['metric']} (%)")
    ax.grid(alpha=0.3)
    ax.legend(title="student loss")
    plots.save_png(fig, path)
    return True


def _row(c: ml_collections.ConfigDict, model: str, mode: str, fraction: float | None, seed: int, init: bool,
         result: train.RunResult, workdir: epath.Path, variant: str, n_bridge: int) -> dict:
    m, nan = result.metrics, float("nan")
    row = {"model": model, "mode": mode, "variant": variant, "bridge params": n_bridge, "seed": seed,
           "steps": result.steps, "this run": _this_run(result), "wall time (s)": round(result.wall_time_s, 1)}
    if c.domain != "language":
        return {**row, "fraction": 1.0 if fraction is None else fraction, "train images": result.train_examples,
                "top-1": round(m.get("top1", nan), 2),
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


