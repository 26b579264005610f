"""SIGTERM and SIGINT in one process: inside the training loop either one asks for a stop (a second Ctrl-C aborts),
outside it either one exits with the resume status. The multi-process agreement and the whole stop, save and
resume are tested on the real entry point in test_multiprocess."""

import os
import signal

import jax
import pytest

from cab_jax import preemption

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
