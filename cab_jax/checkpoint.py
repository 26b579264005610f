"""Orbax checkpoints of a training run: train state and data-iterator position, resumed automatically.

Only the trainable state is saved (student, bridge, optimizer, step, RNG); the frozen teacher is an
input of the train step, never part of the state, so it is never written into student checkpoints.
"""

from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp
from etils import epath

from cab_jax.errors import PathError

STATE, DATA = "state", "data"


class RunCheckpointer:
    """Save/restore ``(state, data iterator)`` pairs under ``directory``; keeps the newest ``keep``."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2):
        self.manager = ocp.CheckpointManager(
            epath.Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter: grain.DatasetIterator | None) -> None:
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iter is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, state, data_iter: grain.DatasetIterator | None):
        """Restore the latest checkpoint into the shapes/shardings of ``state`` (and ``data_iter`` in
        place). Returns ``(state, step)``, or ``(state, None)`` unchanged when there is no checkpoint."""
        step = self.manager.latest_step()
        if step is None:
            return state, None
        items = {STATE: ocp.args.StandardRestore(state)}
        if data_iter is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE], step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def model_params_dir(path: str | os.PathLike) -> epath.Path:
    """The checkpoints folder of a run workdir (or the folder itself) holding at least one step; ``PathError``
    naming what was expected otherwise."""
    root = epath.Path(path)
    ckpt_dir = root / "checkpoints" if (root / "checkpoints").exists() else root
    if not ckpt_dir.exists():
        raise PathError(f"no checkpoint directory at {ckpt_dir} (expected a workdir of a finished "
                        "train_teacher/distill run, or its checkpoints/ folder)")
    if not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        raise PathError(f"{ckpt_dir} holds no checkpoint steps")
    return ckpt_dir


def load_model_params(path: str | os.PathLike, target: dict) -> dict:
    """Model parameters from a run directory written by this trainer (``.../checkpoints``, latest step,
    ``params/model``), restored into the shapes/shardings of ``target`` (a pure-dict tree)."""
    ckpt_dir = model_params_dir(path)
    manager = ocp.CheckpointManager(ckpt_dir.absolute(), item_handlers={STATE: ocp.PyTreeCheckpointHandler()},
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.PyTreeRestore(
            item={"params": {"model": target}},
            restore_args=ocp.checkpoint_utils.construct_restore_args({"params": {"model": target}}),
            partial_restore=True)}))
    manager.close()
    return restored[STATE]["params"]["model"]


def save_model_params(path: str | os.PathLike, params: dict) -> None:
    """Model parameters alone, laid out like a run's checkpoint (step 0 of ``path/checkpoints``, under
    ``params/model``), so that ``load_model_params`` and ``teacher.init_from`` / ``student.init_from`` read it."""
    manager = ocp.CheckpointManager(epath.Path(path).absolute() / "checkpoints",
                                    options=ocp.CheckpointManagerOptions(create=True),
                                    item_handlers={STATE: ocp.StandardCheckpointHandler()})
    manager.save(0, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave({"params": {"model": params}})}),
                 force=True)
    manager.wait_until_finished()
    manager.close()
