"""README's language demo end to end, shrunk: ``python -m cab_jax.main --config=configs/demo_lm.py`` builds the
corpus and its tokenizer, trains the teacher, distils one student per mode and writes the table of held-out
perplexities; a second run reuses every finished run; ``python -m cab_jax.generate`` then continues a prompt from
the student's workdir (recurrent state) and the teacher's (KV cache)."""

import json
import subprocess
import sys

import pytest
from multiprocess_job import ROOT

SHRINK = [  # a 200 kB corpus, a 512-token vocabulary, two-layer models of width 32, two steps each
    "--config.data.max_corpus_bytes=200000", "--config.data.vocab_size=512", "--config.data.seq_len=32",
    "--config.teacher.vocab_size=512", "--config.teacher.hidden_size=32", "--config.teacher.depth=2",
    "--config.teacher.num_heads=2", "--config.teacher.intermediate_size=64", "--config.teacher.train.steps=2",
    "--config.student.vocab_size=512", "--config.student.d_model=32", "--config.student.depth=2",
    "--config.student.d_state=16", "--config.student.n_qk_heads=2", "--config.student.n_v_heads=2",
    "--config.student.intermediate_size=64", "--config.student.chunk_size=8", "--config.train.steps=2",
]


def run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_the_language_demo_trains_every_mode_reuses_its_runs_and_generates(tmp_path):
    command = ("cab_jax.main", "--config=configs/demo_lm.py", f"--workdir={tmp_path}", *SHRINK)
    run(*command)
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["model"].split()[0], r["mode"], r["this run"]) for r in rows] == [
        ("teacher", "supervised", "trained"), ("student", "vanilla", "trained"), ("student", "soft", "trained"),
        ("student", "cab", "trained")], rows
    assert all(r["held-out perplexity"] > 1 for r in rows), rows
    assert "held-out perplexity" in (tmp_path / "results.md").read_text()

    run(*command)  # every run finished: each is reused, with the same figures
    again = json.loads((tmp_path / "results.json").read_text())
    assert [r["this run"] for r in again] == ["reused"] * 4, again
    unchanged = lambda r: {k: v for k, v in r.items() if k not in ("this run", "wall time (s)")}
    assert [unchanged(r) for r in again] == [unchanged(r) for r in rows]

    for workdir, form in ((tmp_path / "students" / "cab" / "seed0", "student, recurrent state"),
                          (tmp_path / "teacher", "teacher, KV cache")):
        out = run("cab_jax.generate", f"--workdir={workdir}", "--prompt=def fib(", "--max_new_tokens=5").stdout
        text, summary = out.rstrip("\n").rsplit("\n", 1)
        assert text.startswith("def fib(") and len(text) > len("def fib("), out
        assert summary.startswith(f"[{form}] 5 tokens"), out
