"""Orbax checkpoints of a training run: train state and data-iterator position, resumed automatically.

Only the trainable state is saved (student, bridge, optimizer, step, RNG); the frozen teacher is an
input of the train step, never part of the state, so it is never written into student checkpoints.
"""

from __future__ import annotations

import os

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from cab_jax.errors import FileFormatError, PathError

STATE, DATA = "state", "data"
# Orbax splits each array replicated over devices into one slice per replica, so that each device writes its part;
# every slice is one device operation, which for a model of many small arrays costs more than it saves (a second per
# save of a 500-array state on 8 CPU devices). Arrays whose slices would be smaller than this are written whole.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """The train state's handler: orbax's standard one (the same files), whole arrays below
    ``MIN_REPLICA_SLICE_BYTES`` per replica."""
    arrays = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
    return ocp.PyTreeCheckpointHandler(type_handler_registry=ocp.type_handlers.create_type_handler_registry(
        (jax.Array, arrays)))


class RunCheckpointer:
    """Save/restore ``(state, data iterator)`` pairs under ``directory``; keeps the newest ``keep``.

    One checkpoint per step for the whole job: each process writes its shards of the state, the primary process
    the iterator's state (a small JSON dict, the same on every process, see
    :class:`cab_jax.data.loader.TrainIterator`), so a run restores with another process count or mesh. Saves are
    asynchronous: training goes on while the files are written (:meth:`wait` blocks until they are)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2):
        self.directory = epath.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True),
            item_handlers={STATE: _state_handler(), DATA: ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter: grain.DatasetIterator | None) -> None:
        items = {STATE: ocp.args.PyTreeSave(state)}
        if data_iter is not None:
            items[DATA] = ocp.args.JsonSave(data_iter.get_state())
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, state, data_iter: grain.DatasetIterator | None):
        """Restore the newest readable checkpoint into the shapes/shardings of ``state`` (and ``data_iter`` in
        place). Returns ``(state, step)``, or ``(state, None)`` unchanged when there is no checkpoint.

        A step that cannot be read (truncated files, non-finite parameters) is skipped with a warning naming it,
        and the next older one is tried; when none can be read, the newest step's error is raised."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        first_error = None
        for step in steps:
            try:
                restored, iterator_state = self._restore_step(step, state, data_iter is not None)
            except Exception as e:  # any unreadable step; the newest step's error is raised when none is readable
                logging.warning("Checkpoint step %d in %s cannot be restored (%s: %s); trying an older one.", step,
                                self.directory, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
                first_error = first_error or e
                continue
            if iterator_state is not None:
                data_iter.set_state(iterator_state)
            if step != steps[0]:
                logging.warning("Resuming from checkpoint step %d: the newer steps %s could not be restored.", step,
                                [s for s in steps if s > step])
            return restored, step
        if first_error is not None:
            raise first_error
        return state, None

    def _restore_step(self, step: int, state, with_data: bool):
        items = {STATE: ocp.args.PyTreeRestore(state, restore_args=ocp.checkpoint_utils.construct_restore_args(state))}
        if with_data:
            items[DATA] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if not bool(all_finite(restored[STATE]["params"])):
            raise FileFormatError(f"checkpoint step {step} holds non-finite parameters")
        return restored[STATE], restored[DATA] if with_data else None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


@jax.jit
def all_finite(tree) -> jax.Array:
    """Whether every entry of every array in ``tree`` is finite (a replicated boolean, readable on each process)."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


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
