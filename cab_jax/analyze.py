"""Analyses of trained runs.

    python -m cab_jax.analyze attention --workdir=RUN [--compare=OTHER_RUN,...] [--num_examples=64]
    python -m cab_jax.analyze curves --workdir=RUN [--compare=OTHER_RUN,...]

``attention`` (CAB's Fig. 3), for students: each layer's implicit attention (the matrix its scans apply to their
input: a Vim layer's averaged over channels and summed over its two directions, a Phi-Mamba layer's averaged over
heads; then averaged over eval images or token windows) beside the softmax attention of the teacher layer the
bridge maps it to (averaged over heads and the same inputs; causal for Phi; a DeiT teacher's cls token moved to
the student's middle position), and their similarity per layer: the cosine of the flattened maps and Spearman's
rank correlation of their entries. Runs without a bridge (vanilla, soft) use the
layer map their config names. Writes ``attention.json``, ``attention_similarity.png`` (one line per run) and
``attention_maps.png`` (teacher and students at a few layers).

``curves``: each run's training curves from ``metrics.jsonl`` (the loss and its terms, the learning rate, the eval
metrics, by step) in ``curves.png``.

Outputs go to ``--out`` (default ``RUN/analysis``). The PNGs need matplotlib (``pip install 'cab-jax[plot]'``).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from absl import flags, logging
from etils import epath
from flax import nnx

from cab_jax import cli, domains, plots, train
from cab_jax.bridge import move_cls_token
from cab_jax.errors import ConfigError, PathError
from cab_jax.models.layers import attention_weights

COMMANDS = ("attention", "curves")


def define_flags() -> None:
    """The command line's flags (defined on demand: other entry points that tests import define their own)."""
    flags.DEFINE_string("workdir", None, "Workdir of a training run (holds run_config.json).")
    flags.DEFINE_list("compare", [], "Other runs' workdirs, analysed the same way and drawn beside it.")
    flags.DEFINE_integer("num_examples", 64, "attention: eval examples (images, or token windows) the maps are "
                         "averaged over.")
    flags.DEFINE_integer("batch_size", 16, "attention: examples per forward pass.")
    flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/analysis).")


def similarity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Cosine of the flattened maps, and Spearman's rank correlation of their entries."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    return {"cosine": cosine, "spearman": float(scipy.stats.spearmanr(a, b).statistic)}


def eval_inputs(c, count: int) -> np.ndarray:
    """The model inputs of the first ``count`` examples of the run's eval split (images, or token windows; fewer if
    the split is smaller), padding excluded."""
    domain = domains.for_config(c)
    chunks, have = [], 0
    for batch in domain.data.eval_batches(domain.job().data, global_batch_size=min(count, 256)):
        mask = np.asarray(batch["mask"] if "mask" in batch else batch["loss_mask"])
        real = mask.reshape(len(mask), -1).max(axis=1) > 0
        chunks.append(np.asarray(domain.eval_inputs(batch))[real][:count - have])
        have += len(chunks[-1])
        if have >= count:
            break
    if not have:
        raise ConfigError(f"the eval split of {c.data.get('name', c.domain)} has no examples to average the maps over")
    return np.concatenate(chunks)


def _averaged(fn, inputs: np.ndarray, batch: int) -> np.ndarray:
    """The mean over ``inputs`` of ``fn(batch of inputs)``, a per-example mean, computed ``batch`` at a time."""
    total = 0.0
    for start in range(0, len(inputs), batch):
        chunk = inputs[start:start + batch]
        total = total + np.asarray(fn(jnp.asarray(chunk)), np.float64) * len(chunk)
    return total / len(inputs)


def _compiled(model: nnx.Module, method):
    """``method(model, inputs)`` jitted, with the model's state an argument (not constants of the program)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x: method(nnx.merge(graphdef, s), x))
    return lambda inputs: fn(state, inputs)


def student_maps(student: nnx.Module, inputs: np.ndarray, batch: int) -> np.ndarray:
    """(depth, tokens, tokens): each layer's implicit attention, averaged over ``inputs``."""
    return _averaged(_compiled(student, lambda m, x: m.implicit_attention(x).mean(1)), inputs, batch)


def teacher_maps(teacher: nnx.Module, inputs: np.ndarray, batch: int, causal: bool) -> np.ndarray:
    """(depth, tokens, tokens): each layer's softmax attention, averaged over heads and ``inputs`` (the teacher's
    token order)."""

    def maps(model, x):
        _, (q, k) = model(x)  # each (depth, batch, heads, tokens, head_dim), before the 1/sqrt(head_dim) scale
        return attention_weights(q, k, causal).mean(axis=(1, 2))

    return _averaged(_compiled(teacher, maps), inputs, batch)


def attention_report(runs: Sequence[str], num_examples: int, batch: int) -> list[dict]:
    """Per run: its loss mode, the similarity of each bridged layer's map to its teacher layer's (``layers``),
    their means, and the maps themselves (``maps``: student (depth, T, T), teacher (teacher depth, T, T) in the
    student's token order)."""
    teachers, report = {}, []
    for run in runs:
        c, trained = train.read_run_config(run)
        if trained != "student":
            raise ConfigError(f"{run} trained a teacher: the attention analysis needs a student run")
        if not c.teacher.init_from:
            raise ConfigError(f"{run}: its config has no teacher.init_from, so there is no teacher to compare with")
        domain = domains.for_config(c)
        student = train.load_built_model(domain.build_student, run)
        inputs = eval_inputs(c, num_examples)
        cls_position = domain.cls_position(student)
        key = (c.teacher.init_from, json.dumps(c.data.to_dict(), sort_keys=True, default=str), len(inputs),
               cls_position)
        if key not in teachers:
            teacher = train.load_built_model(domain.build_teacher, c.teacher.init_from)
            maps = teacher_maps(teacher, inputs, batch, causal=c.domain == "language")
            if cls_position is not None:
                maps = np.asarray(move_cls_token(maps, cls_position, axes=(-2, -1)))
            teachers[key] = maps
        mine, theirs = student_maps(student, inputs, batch), teachers[key]
        layers = [{"student_layer": layer, "teacher_layer": g, **similarity(mine[layer], theirs[g])}
                  for layer, g in enumerate(domains.bridge_layer_map(c)) if g >= 0]
        if not layers:
            raise ConfigError(f"{run}: its bridge layer map bridges no student layer, so there is nothing to compare")
        report.append({"run": run, "mode": c.loss.mode, "examples": len(inputs), "layers": layers,
                       "mean_cosine": float(np.mean([r["cosine"] for r in layers])),
                       "mean_spearman": float(np.mean([r["spearman"] for r in layers])),
                       "maps": {"student": mine, "teacher": theirs}})
    return report


def _label(entry: dict) -> str:
    return f"{entry['mode']} ({'/'.join(epath.Path(entry['run']).parts[-2:])})"


def plot_similarity(report: list[dict], path: epath.Path) -> bool:
    fig = plots.new_figure("attention similarity plot", figsize=(9, 3.5))
    if fig is None:
        return False
    for ax, measure in zip(fig.subplots(1, 2), ("cosine", "spearman"), strict=True):
        for entry in report:
            ax.plot([r["student_layer"] for r in entry["layers"]], [r[measure] for r in entry["layers"]],
                    marker="o", label=_label(entry))
        ax.set_xlabel("student layer")
        ax.set_xticks(sorted({r["student_layer"] for entry in report for r in entry["layers"]}))  # whole layers
        ax.set_ylabel(f"{measure} to the teacher's map")
        ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    plots.save_png(fig, path)
    return True


def plot_maps(report: list[dict], path: epath.Path, rows: int = 4) -> bool:
    """The teacher's map (of the first run's layer map) and each run's, at up to ``rows`` student layers."""
    layers = report[0]["layers"]
    picked = [layers[i] for i in sorted(set(np.linspace(0, len(layers) - 1, min(rows, len(layers))).round()
                                            .astype(int)))]
    fig = plots.new_figure("attention maps", figsize=(2.6 * (1 + len(report)), 2.4 * len(picked)))
    if fig is None:
        return False
    axes = np.asarray(fig.subplots(len(picked), 1 + len(report), squeeze=False))
    for row, layer in zip(axes, picked, strict=True):
        panels = [(f"teacher layer {layer['teacher_layer']}", report[0]["maps"]["teacher"][layer["teacher_layer"]])]
        panels += [(f"{e['mode']} layer {layer['student_layer']}", e["maps"]["student"][layer["student_layer"]])
                   for e in report]
        for ax, (title, image) in zip(row, panels, strict=True):
            ax.imshow(image, cmap="viridis")
            ax.set_title(title, fontsize="small")
            ax.set_xticks([])
            ax.set_yticks([])
    plots.save_png(fig, path)
    return True


def read_metrics(workdir: str) -> dict[str, dict[int, dict]]:
    """``metrics.jsonl`` by split and step (a step logged again after a restart replaces the earlier record)."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise PathError(f"{path} not found: --workdir must be the workdir of a training run")
    out: dict[str, dict[int, dict]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        out.setdefault(record["split"], {})[record["step"]] = record
    return out


LOSS_TERMS = ("loss", "ce", "kl", "bridge")
EVAL_METRICS = ("top1", "perplexity", "eval_loss")


def plot_curves(runs: Sequence[str], path: epath.Path) -> dict[str, dict[str, list]]:
    """Each run's loss terms, learning rate and first eval metric of ``EVAL_METRICS`` against the step, drawn to
    ``path`` (when matplotlib is there); returns the series by run and name."""
    series: dict[str, dict[str, list]] = {}
    for run in runs:
        metrics = read_metrics(run)
        train_steps = sorted(metrics.get("train", {}))
        named = {}
        for name in (*LOSS_TERMS, "lr"):
            if train_steps and name in metrics["train"][train_steps[-1]]:
                named[name] = [(s, metrics["train"][s][name]) for s in train_steps if name in metrics["train"][s]]
        evals = metrics.get("eval", {})
        for name in EVAL_METRICS:
            if any(name in r for r in evals.values()):
                named[name] = [(s, r[name]) for s, r in sorted(evals.items()) if name in r]
                break
        series[run] = named
    fig = plots.new_figure("curves plot", figsize=(12, 3.5))
    if fig is None:
        return series
    loss_ax, lr_ax, eval_ax = fig.subplots(1, 3)
    for style, (run, named) in zip(itertools.cycle(("-", "--", ":", "-.")), series.items()):
        label = "/".join(epath.Path(run).parts[-2:])
        for name, points in named.items():
            ax = loss_ax if name in LOSS_TERMS else lr_ax if name == "lr" else eval_ax
            ax.plot(*zip(*points, strict=True), style, marker="o" if ax is eval_ax else None,
                    label=f"{name} ({label})")
            if ax is eval_ax:
                ax.set_ylabel(name)
    loss_ax.set_yscale("log")
    for ax, title in ((loss_ax, "loss terms (train)"), (lr_ax, "learning rate"), (eval_ax, "eval")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    plots.save_png(fig, path)
    return series


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        cli.fail(f"usage: python -m cab_jax.analyze {{{'|'.join(COMMANDS)}}} --workdir=RUN [--compare=RUN,...]")
    f = flags.FLAGS
    if f.num_examples < 1 or f.batch_size < 1:
        cli.fail(f"--num_examples ({f.num_examples}) and --batch_size ({f.batch_size}) must be positive")
    runs = [f.workdir, *f.compare]
    out = epath.Path(f.out or epath.Path(f.workdir) / "analysis")  # created once there is something to write
    if argv[1] == "curves":
        if plot_curves(runs, out / "curves.png") and (out / "curves.png").exists():
            logging.info("Wrote %s.", out / "curves.png")
        return
    report = attention_report(runs, f.num_examples, f.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    plot_similarity(report, out / "attention_similarity.png")
    plot_maps(report, out / "attention_maps.png")
    numbers = [{k: v for k, v in entry.items() if k != "maps"} for entry in report]
    (out / "attention.json").write_text(json.dumps(numbers, indent=1))
    for entry in numbers:
        logging.info("%s: mean cosine %.3f, mean Spearman %.3f over %d layers (%d eval examples)", _label(entry),
                     entry["mean_cosine"], entry["mean_spearman"], len(entry["layers"]), entry["examples"])
    logging.info("Wrote %s.", out)


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["workdir"])
    cli.run(main)
