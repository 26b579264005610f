"""SIGTERM and SIGINT in one process: inside the training loop either one asks for a stop (a second Ctrl-C aborts),
outside it either one exits with the resume status, from the entry point's first lines on. The multi-process
agreement and the whole stop, save and resume are tested on the real entry point in test_multiprocess."""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import pytest

from cab_jax import preemption

ROOT = pathlib.Path(__file__).parents[1]

SIGNALS = [signal.SIGTERM, signal.SIGINT]


@pytest.fixture
def restored_handlers():
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("signum", SIGNALS, ids=["SIGTERM", "SIGINT"])
def test_either_signal_asks_the_loop_to_stop(restored_handlers, signum):
    before = signal.getsignal(signum)
    with preemption.StopRequest(jax.make_mesh((1,), ("data",))) as stop:
        assert not stop.agreed()
        os.kill(os.getpid(), signum)
        assert stop.requested and stop.agreed()
    assert signal.getsignal(signum) is before


def test_a_second_ctrl_c_aborts(restored_handlers):
    with preemption.StopRequest(jax.make_mesh((1,), ("data",))) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("signum", SIGNALS, ids=["SIGTERM", "SIGINT"])
def test_outside_the_loop_either_signal_exits_to_be_resumed(restored_handlers, signum):
    preemption.exit_on_signals()
    with pytest.raises(SystemExit) as exit_:
        os.kill(os.getpid(), signum)
    assert exit_.value.code == preemption.EXIT_RESUME == 75


def test_a_signal_while_the_entry_point_imports_exits_to_be_resumed(tmp_path):
    """SIGTERM (a preemption) while ``cab_jax.main`` is still importing, before JAX is even loaded: exit status 75 and
    one line, not a death by signal that a scheduler would read as a failure."""
    proc = subprocess.Popen([sys.executable, "-m", "cab_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path}"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:  # (a failed check must not leave the demo training)
        status, deadline = pathlib.Path(f"/proc/{proc.pid}/status"), time.time() + 60
        while not int(re.search(r"SigCgt:\s*([0-9a-f]+)", status.read_text())[1], 16) >> (signal.SIGTERM - 1) & 1:
            assert proc.poll() is None and time.time() < deadline, "the entry point never handled SIGTERM"
            time.sleep(0.002)
        assert "jaxlib" not in pathlib.Path(f"/proc/{proc.pid}/maps").read_text(), "handled only after JAX loaded"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == preemption.EXIT_RESUME and "Signal 15 before the run started" in err, err[-2000:]
