"""SIGTERM and SIGINT in one process: inside the training loop either one asks for a stop (a second Ctrl-C aborts),
outside it either one exits with the resume status (a compile in progress included), from the entry point's first
lines on. The multi-process
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


# A process that installs the handler, then compiles a program big enough to take seconds, and gets the signal from
# a timer 0.3 s into the compile.
_SIGNAL_DURING_COMPILE = """
import os, signal, sys, threading
import jax, jax.numpy as jnp
from cab_jax import preemption
preemption.exit_on_signals()
def big(x):
    for i in range(2000):
        x = jnp.sin(x @ x.T + i)
    return x
lowered = jax.jit(big).trace(jnp.ones((64, 64))).lower()
threading.Timer(0.3, os.kill, (os.getpid(), int(sys.argv[1]))).start()
lowered.compile()  # about 3 s with the tests' fast-compile flags
print("compiled before the signal: lengthen the program", flush=True)
threading.Event().wait(60)
"""


@pytest.mark.parametrize("signum", SIGNALS, ids=["SIGTERM", "SIGINT"])
def test_outside_the_loop_either_signal_exits_to_be_resumed_even_while_xla_compiles(signum):
    """Exit status 75 and one warning line. Raising from the handler (SystemExit) while XLA compiles ended in a
    segmentation fault at interpreter exit (status 139)."""
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_DURING_COMPILE, str(int(signum))], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert "compiled before the signal" not in proc.stdout
    assert proc.returncode == preemption.EXIT_RESUME == 75, proc.stderr[-2000:]
    assert f"Signal {int(signum)} outside the training loop: exiting with status 75" in proc.stderr


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
