"""Where a distillation train step's device time goes: a profile of a few steps, by part of the model.

    python benchmarks/step_profile.py --config=vim_small --dtype=bfloat16 --remat=false --batch_size=128

Builds the step as ``train_throughput.py`` does (synthetic images on the device), times ``--steps`` steps, then
records ``--profile_steps`` more with ``jax.profiler`` and sums the device time of every executed HLO op by the
innermost of the model's named scopes in its metadata (``SCOPES``: ``jax.named_scope`` in the models and the train
step; a fusion XLA made without metadata, such as a padded copy before a matmul, by the ops inside it). Ops under a
``transpose(...)`` name (the backward pass, remat's recomputation included) are counted apart from the forward pass.
Device events without an HLO op inside the step (a library's own kernels, memsets) count as ``no hlo op``, so
``host and idle``, the step's wall time minus the time the device was busy, is time no kernel ran. On GPU the step
runs without CUDA graphs here (XLA's command buffers hide the kernels from the profile), so its wall time is a
little above ``train_throughput.py``'s. On CPU the ops of several threads overlap, so the parts can sum past the
step. Prints three Markdown tables (parts, the slowest ops, and the longest idle gaps between the step's ops, by the
ops on either side); ``--out`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import add_overrides_flag, synthetic_setup  # benchmarks/common.py

from cab_jax.summary import markdown_table

# Device events inside the step's span without an HLO op (a library's own kernels, memsets): op name prefix.
UNNAMED = "no hlo op: "

# The named scopes of the step, as parts of the table (innermost wins).
SCOPES = ("prepare", "teacher", "student", "patch_embed", "norm_residual", "in_proj", "conv1d", "x_proj",
          "selective_scan", "out_proj", "head", "soft_loss", "bridge", "attention_transfer", "optimizer")


def op_scopes(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its metadata's op_name, from a compiled module's text. A fusion without one (XLA's own,
    such as the padded copy before a split-K matmul) takes the first op_name in the computation it calls."""
    op_name = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]*)\"")
    calls = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\bcalls=%?([\w.\-]+)")
    scopes, first_in, callers, computation = {}, {}, {}, None
    for line in hlo_text.splitlines():
        if line.rstrip().endswith("{") and not line[:1].isspace():  # a computation's header
            computation = re.sub(r"^ENTRY\s+", "", line).lstrip("%").split(" ", 1)[0]
        elif named := op_name.match(line):
            scopes[named[1]] = named[2]
            first_in.setdefault(computation, named[2])
        elif call := calls.match(line):
            callers[call[1]] = call[2]
    return {**{op: first_in[c] for op, c in callers.items() if c in first_in}, **scopes}


def part_of(op_name: str | None) -> tuple[str, bool]:
    """(innermost known scope of ``op_name``, else "other", or "no metadata" without one; whether it is in the
    backward pass)."""
    if op_name is None:
        return "no metadata", False
    known = [p for p in re.split(r"[/()]", op_name) if p in SCOPES]
    return (known[-1] if known else "other"), "transpose" in op_name


def part_of_op(op: str, scopes: dict[str, str]) -> tuple[str, bool]:
    """``part_of`` the op's scope; the part "no hlo op" for a device event without one."""
    return ("no hlo op", False) if op.startswith(UNNAMED) else part_of(scopes.get(op))


def device_events(trace: dict, module: str) -> list[dict]:
    """The trace's op events of ``module``: those of the device's timelines when there are any (GPU), else of the
    host's threads (CPU, where the ops run on the host). On the device, events of its streams that carry no HLO op
    (a library's own kernels, memsets) between the module's first and last op come too, named ``UNNAMED`` + name."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("args", {}).get("hlo_op")
              and module in e["args"].get("hlo_module", "")]
    metadata = [e for e in trace["traceEvents"] if e.get("ph") == "M"]
    processes = {e["pid"]: e["args"]["name"] for e in metadata if e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in metadata if e.get("name") == "thread_name"}
    on_device = [e for e in events if "/device:" in processes.get(e["pid"], "")]
    if not on_device:
        return without_containers(events)
    first, last = min(e["ts"] for e in on_device), max(e["ts"] + e["dur"] for e in on_device)
    devices = {e["pid"] for e in on_device}
    unnamed = [{**e, "args": {**e.get("args", {}), "hlo_op": UNNAMED + e["name"]}} for e in trace["traceEvents"]
               if e.get("ph") == "X" and not e.get("args", {}).get("hlo_op") and e["pid"] in devices
               and "stream" in threads.get((e["pid"], e.get("tid")), "").lower()
               and first <= e["ts"] < last]
    return without_containers(on_device + unnamed)


def without_containers(events: list[dict]) -> list[dict]:
    """``events`` less those that hold another event of their thread (a while loop's event on CPU holds its
    body's ops): the events of one thread nest or are disjoint, so an event holds the next one if that one starts
    before it ends."""
    threads = collections.defaultdict(list)
    for e in events:
        threads[(e["pid"], e["tid"])].append(e)
    kept = []
    for thread in threads.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        kept += [e for e, after in zip(thread, [*thread[1:], None], strict=True)
                 if after is None or after["ts"] >= e["ts"] + e["dur"]]
    return kept


def busy_us(events: list[dict], gaps: collections.Counter | None = None) -> float:
    """Microseconds covered by at least one event: their span less the gaps between them (``idle_gaps``, computed
    here unless given)."""
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    return span - sum((idle_gaps(events) if gaps is None else gaps).values())


def idle_gaps(events: list[dict]) -> collections.Counter:
    """Microseconds the device sat idle between two of ``events`` (on any of its timelines), summed by the pair
    of ops around each gap: (the op that ended last before it, the op that starts it)."""
    gaps, end, last = collections.Counter(), None, None
    for e in sorted(events, key=lambda e: e["ts"]):
        if end is not None and e["ts"] > end:
            gaps[(last["args"]["hlo_op"], e["args"]["hlo_op"])] += e["ts"] - end
        if end is None or e["ts"] + e["dur"] > end:
            end, last = e["ts"] + e["dur"], e
    return gaps


def read_trace(log_dir: str) -> dict:
    files = sorted(pathlib.Path(log_dir).rglob("*.trace.json.gz")) or sorted(pathlib.Path(log_dir).rglob("*.json.gz"))
    if not files:
        raise FileNotFoundError(f"no trace written under {log_dir}")
    with gzip.open(files[-1]) as f:
        return json.load(f)


def profile(args: argparse.Namespace) -> dict:
    import jax

    built, batches = synthetic_setup(args.config, args.dtype, args.batch_size, args.steps, args.remat, args.mode,
                                     args.scan_impl, args.remat_policy, overrides=args.set)
    step, state, teacher = built.trainer.jit_train_step, built.state, built.teacher_params
    compiled = step.lower(state, teacher, batches[0]).compile()
    scopes = op_scopes(compiled.as_text())
    for i in range(3):
        state, metrics = step(state, teacher, batches[i % 2])
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(args.steps):
        state, metrics = step(state, teacher, batches[i % 2])
    jax.block_until_ready(metrics)
    step_ms = 1e3 * (time.perf_counter() - start) / args.steps
    with tempfile.TemporaryDirectory() as log_dir:
        jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
        for i in range(args.profile_steps):
            state, metrics = step(state, teacher, batches[i % 2])
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        events = device_events(read_trace(log_dir), "train_step")
    if not events:
        raise RuntimeError("the profile holds no op of the train step")
    per_step = lambda us: round(us / 1e3 / args.profile_steps, 3)
    totals, ops = collections.defaultdict(lambda: [0.0, 0.0]), collections.Counter()
    for e in events:
        part, backward = part_of_op(e["args"]["hlo_op"], scopes)
        totals[part][backward] += e["dur"]
        ops[(e["args"]["hlo_op"], part, backward)] += e["dur"]
    gaps_us = idle_gaps(events)
    busy = per_step(busy_us(events, gaps_us))
    parts = [{"part": part, "forward ms": per_step(fwd), "backward ms": per_step(bwd), "ms": per_step(fwd + bwd),
              "% of step": round(100 * per_step(fwd + bwd) / step_ms, 1)}
             for part, (fwd, bwd) in sorted(totals.items(), key=lambda kv: -sum(kv[1]))]
    parts.append({"part": "host and idle", "ms": round(max(step_ms - busy, 0.0), 3),
                  "% of step": round(100 * max(step_ms - busy, 0.0) / step_ms, 1)})
    slowest = [{"op": op, "part": part, "pass": "backward" if backward else "forward", "ms": per_step(us),
                "jax op": (scopes.get(op) or "").rsplit("/", 1)[-1]}
               for (op, part, backward), us in ops.most_common(args.top)]
    name = lambda op: f"{op} ({part_of_op(op, scopes)[0]})"
    gaps = [{"idle after": name(before), "before": name(after), "ms": per_step(us)}
            for (before, after), us in gaps_us.most_common(args.gaps)]
    images_per_s = args.batch_size / step_ms * 1e3
    return {"config": args.config, "dtype": args.dtype, "remat": args.remat, "remat_policy": args.remat_policy,
            "mode": args.mode,
            "scan_impl": args.scan_impl, "batch": args.batch_size, "ms_per_step": round(step_ms, 2),
            "images_per_s": round(images_per_s, 1), "device_busy_ms": busy, "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "parts": parts, "slowest_ops": slowest, "idle_gaps": gaps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="vim_small")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--remat", type=lambda s: s.lower() == "true", default=False)
    parser.add_argument("--remat_policy", default="full")
    parser.add_argument("--mode", default="cab")
    parser.add_argument("--scan_impl", default="auto")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="steps timed for the wall time per step")
    parser.add_argument("--profile_steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="rows of the slowest-ops table")
    parser.add_argument("--gaps", type=int, default=10, help="rows of the idle-gaps table")
    parser.add_argument("--out", help="also write the result as JSON here")
    add_overrides_flag(parser)
    args = parser.parse_args()
    # XLA runs a GPU step's kernels as CUDA graphs (command buffers), which the profile shows as one event each:
    # without them every kernel is its own event with its own op (the step's launches cost a little more).
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_enable_command_buffer=".strip()
    result = profile(args)
    tables = ("parts", "slowest_ops", "idle_gaps")
    print(" ".join(f"{k}={v}" for k, v in result.items() if k not in tables))
    print("\n\n".join(markdown_table(result[k]) for k in tables if result[k]))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
