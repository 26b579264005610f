"""Train or study what a config file describes.

    python -m cab_jax.main --config=configs/NAME.py[:variant] --workdir=DIR [--config.FIELD=VALUE ...]
    python -m cab_jax.main --config=configs/NAME.py[:variant] [--config.FIELD=VALUE ...] --print_config

The config's task says what runs: one training run (distill, train_teacher) or a study (the teacher once, then one
student per loss mode). ``--print_config`` prints every field and the values derived from them for the devices
present (steps, warmup, learning rate, epochs, batches, mesh, parameter counts) and exits without training. The
same command runs on a laptop CPU, a GPU host and a TPU pod; pass ``--jax_distributed`` on multi-process launches
(TPU pods, multi-host GPU) so that ``jax.distributed.initialize()`` runs first.

Exit status: 0 finished; 75 stopped by SIGTERM/SIGINT after saving the current step (run the same command to
resume; schedulers requeue on it); 2 a usage or config error (one line on stderr); 1 a diverged run (a non-finite
loss, one line) or a failure (with its traceback).
"""

from __future__ import annotations

import signal
import sys

from cab_jax.errors import EXIT_RESUME


def _resume_later(signum, frame) -> None:
    sys.stderr.write(f"Signal {signum} before the run started: exiting with status {EXIT_RESUME} (run the same "
                     "command again).\n")
    sys.exit(EXIT_RESUME)


if __name__ == "__main__":  # first: the imports below take seconds, and a preemption then must not read as a failure
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, _resume_later)

import tempfile

import jax
from absl import flags, logging
from etils import epath
from ml_collections import config_flags

from cab_jax import cli, preemption, study, summary, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/NAME.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results (created when the "
                               "run starts).")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config and its derived values (steps, "
                                  "lr, batches, mesh, parameter counts), then exit without training.")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() first (multi-process "
                                  "runs); without the three flags below JAX detects the cluster (TPU pods, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, with --jax_distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes, with --jax_distributed.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, with --jax_distributed.")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 60, "With --jax_distributed: a process that sends no "
                                  "heartbeat for this long is declared lost, and every other process exits.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
    c = _CONFIG.value
    if _PRINT_CONFIG.value:
        if c.task != "study":
            print(summary.describe(c), flush=True)
        elif _WORKDIR.value:  # a study builds the embedded datasets in its workdir
            print(summary.describe(c, str(epath.Path(_WORKDIR.value) / "tfds")), flush=True)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                print(summary.describe(c, tmp), flush=True)
        return
    if not _WORKDIR.value:
        cli.fail("--workdir is required: the run's checkpoints, metrics and results go there")
    preemption.exit_on_signals()
    if _DISTRIBUTED.value:
        # CPU processes reduce over gloo; GPU (NCCL) and TPU runs ignore the setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                   heartbeat_timeout_seconds=_HEARTBEAT.value)
    logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(), jax.process_count(),
                 jax.devices())
    if c.task == "study":
        finished = study.run(c, _WORKDIR.value)[1]
    else:
        result = train.train_and_evaluate(c, _WORKDIR.value)
        logging.info("Result: %s", result)
        finished = not result.stopped_early
    if not finished:
        sys.exit(EXIT_RESUME)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")  # here, not at import: importers keep their own flag checks
    cli.run(main)
