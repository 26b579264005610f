"""Faults a long run meets: unreadable checkpoints are skipped for the newest readable one, and a non-finite loss
never reaches the parameters (the run stops naming the step and the loss terms, or skips the update)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import build_trainer, small_config

from cab_jax import checkpoint, sharding, train
from cab_jax.errors import DivergedError


class FakeIterator:
    """What the checkpointer needs of a data iterator: a JSON-able state."""

    def __init__(self, step=0):
        self.step = step

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = state["step"]


def state_at(value, step=0):
    return {"params": {"w": jnp.full((4, 3), value, jnp.float32)}, "step": jnp.array(step, jnp.int32)}


def saved(directory, steps, *, nan_at=None):
    ckpt = checkpoint.RunCheckpointer(directory, keep=5)
    for step in steps:
        state = state_at(np.nan if step == nan_at else step, step)
        ckpt.save(step, state, FakeIterator(step))
    ckpt.wait()
    ckpt.close()


def truncate_files(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 0]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def restore(directory):
    ckpt = checkpoint.RunCheckpointer(directory)
    iterator = FakeIterator()
    state, step = ckpt.restore(state_at(0.0), iterator)
    ckpt.close()
    return state, step, iterator.step


def test_only_the_newest_keep_checkpoints_stay_on_disk(tmp_path):
    """README: ``train.keep_checkpoints`` (default 2) are kept: older steps are deleted as newer ones land."""
    ckpt = checkpoint.RunCheckpointer(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        ckpt.save(step, state_at(step, step), FakeIterator(step))
    ckpt.wait()
    ckpt.close()
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [3, 4]
    state, step, data_step = restore(tmp_path)
    assert (step, data_step, float(state["params"]["w"][0, 0])) == (4, 4, 4.0)


def test_a_truncated_step_falls_back_to_the_newest_intact_one(tmp_path, caplog):
    saved(tmp_path, [2, 4, 6])
    truncate_files(tmp_path / "6")
    (tmp_path / "8.orbax-checkpoint-tmp-1234").mkdir()  # a save killed before it finished
    with caplog.at_level("WARNING"):
        state, step, data_step = restore(tmp_path)
    assert step == data_step == 4
    np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 4.0))
    assert "Checkpoint step 6" in caplog.text and "cannot be restored" in caplog.text
    assert "newer steps [6]" in caplog.text


def test_a_step_with_non_finite_parameters_is_never_resumed(tmp_path, caplog):
    saved(tmp_path, [2, 4], nan_at=4)
    with caplog.at_level("WARNING"):
        _, step, _ = restore(tmp_path)
    assert step == 2 and "non-finite" in caplog.text


def test_no_readable_step_raises_instead_of_starting_over(tmp_path):
    saved(tmp_path, [2])
    truncate_files(tmp_path / "2")
    with pytest.raises(Exception):  # noqa: B017 -- whatever orbax raises for the unreadable step
        restore(tmp_path)


def test_a_non_finite_step_leaves_the_state_as_it_was(tmp_path):
    c = small_config(tmp_path)
    c.loss.bridge_weight = float("inf")  # inf * bridge loss: a non-finite loss and gradient
    trainer, state, teacher = build_trainer(c, sharding.make_mesh(c.mesh))
    rng = np.random.default_rng(0)
    batch = sharding.global_batch({"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
                                   "label": rng.integers(0, 10, 16).astype(np.int32)}, trainer.mesh)
    before = jax.device_get(state)  # the step donates its input state
    new, metrics = trainer.jit_train_step(state, teacher, batch)
    assert bool(metrics[train.NONFINITE]) and not np.isfinite(float(metrics["loss"]))
    assert int(new["step"]) == int(before["step"]) + 1
    for key in ("params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(new[key]), before[key])


def flagged(nonfinite):
    return {train.NONFINITE: jnp.array(nonfinite), "loss": jnp.array(np.inf if nonfinite else 1.0),
            "bridge": jnp.array(np.nan if nonfinite else 0.5)}


def test_the_guard_stops_naming_the_step_and_the_loss_terms():
    guard = train.NonFiniteGuard("stop")
    guard.push(1, flagged(False))
    guard.push(2, flagged(True))  # read one step late: the push of step 3 (or a check) raises
    with pytest.raises(DivergedError, match=r"step 2: the loss or its gradient is not finite \(bridge=nan, loss=inf\)"):
        guard.check()
    guard.check()  # checked once


def test_the_guard_skips_with_a_warning(caplog):
    guard = train.NonFiniteGuard("skip")
    with caplog.at_level("WARNING"):
        for step, bad in enumerate([True, False, True], start=1):
            guard.push(step, flagged(bad))
        guard.check()
    assert caplog.text.count("the update was skipped") == 2 and "Step 3:" in caplog.text


class HeldFuture:
    """A write that finishes only when ``released`` is set (orbax waits on its ``result``)."""

    def __init__(self, released):
        self.released = released

    def result(self, timeout=None):
        assert self.released.wait(20), "the held write was never released: did save wait for its own files?"


def test_a_save_returns_while_its_files_are_still_being_written(tmp_path, monkeypatch):
    """README: saves are asynchronous. With the arrays' write held open, ``save`` returns, the checkpoint is not yet
    committed and the checkpointer says a save is in progress; released, ``wait`` commits it and it restores."""
    import threading

    import orbax.checkpoint as ocp

    released = threading.Event()
    serialize = ocp.type_handlers.ArrayHandler.serialize

    async def held_serialize(self, *args, **kwargs):
        return [*await serialize(self, *args, **kwargs), HeldFuture(released)]

    monkeypatch.setattr(ocp.type_handlers.ArrayHandler, "serialize", held_serialize)
    ckpt = checkpoint.RunCheckpointer(tmp_path)
    ckpt.save(3, state_at(3.0, 3), FakeIterator(3))
    assert not released.is_set() and ckpt.manager.is_saving_in_progress()
    assert not (tmp_path / "3").exists()  # written into a temporary directory, renamed when committed
    released.set()
    ckpt.wait()
    ckpt.close()
    state, step, data_step = restore(tmp_path)
    assert (step, data_step) == (3, 3) and float(state["params"]["w"][0, 0]) == 3.0
