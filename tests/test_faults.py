"""Faults a long run meets: unreadable checkpoints are skipped for the newest readable one, and a non-finite loss
never reaches the parameters (the run stops naming the step and the loss terms, or skips the update)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cab_jax import checkpoint, sharding, train
from cab_jax.errors import DivergedError
from test_train import read_metrics, small_config


class FakeIterator:
    """What the checkpointer needs of a data iterator: a JSON-able state."""

    def __init__(self, step=0):
        self.step = step

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = state["step"]


def state_at(value):
    return {"params": {"w": jnp.full((4, 3), value, jnp.float32)}, "step": jnp.array(int(value), jnp.int32)}


def saved(directory, steps, *, nan_at=None):
    ckpt = checkpoint.RunCheckpointer(directory, keep=5)
    for step in steps:
        state = state_at(np.nan if step == nan_at else step)
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


def nonfinite_config(tmp_path, on_nonfinite):
    c = small_config(tmp_path, steps=3, checkpoint_every=1, on_nonfinite=on_nonfinite)
    c.data.synthetic = True
    c.loss.bridge_weight = float("inf")  # inf * bridge loss: a non-finite loss and gradient from the first step
    return c


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_terms(tmp_path):
    with pytest.raises(DivergedError, match=r"step 1: the loss or its gradient is not finite \(.*bridge="):
        train.train_and_evaluate(nonfinite_config(tmp_path, "stop"), str(tmp_path / "run"))
    assert not any(p.name.isdigit() for p in (tmp_path / "run" / "checkpoints").iterdir())


def test_skip_leaves_the_parameters_as_they_were(tmp_path, caplog):
    c = nonfinite_config(tmp_path, "skip")
    initial = train.create_trainer(c, sharding.make_mesh(c.mesh), train_size=1024).state["params"]
    with caplog.at_level("WARNING"):
        result = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert result.steps == 3 and caplog.text.count("the update was skipped") == 3
    ckpt = checkpoint.RunCheckpointer(tmp_path / "run" / "checkpoints")
    state, step = ckpt.restore(train.create_trainer(c, sharding.make_mesh(c.mesh), 1024).state, None)
    ckpt.close()
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, state["params"], initial)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
