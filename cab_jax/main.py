"""Entry point: ``python -m cab_jax.main --config=configs/NAME.py[:variant] --workdir=DIR [--config.x.y=value ...]``
runs the config's task: one training run (distill, train_teacher) or a study.

The same command runs on a laptop CPU, a GPU host and a TPU pod; pass ``--jax_distributed`` on
multi-process launches (TPU pods, multi-host GPU) so ``jax.distributed.initialize()`` runs first.
"""

from __future__ import annotations

import logging as std_logging

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cab_jax import study, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/NAME.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() (multi-process).")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax(record) -> bool:
    """Hide orbax's per-save INFO lines; its warnings and errors still show."""
    return "orbax" not in record.pathname or record.levelno >= std_logging.WARNING


def main(argv: list[str]) -> None:
    logging.get_absl_handler().python_handler.addFilter(_quiet_orbax)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    c = _CONFIG.value
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(), jax.process_count(),
                 jax.devices())
    if c.task == "study":
        study.run(c, _WORKDIR.value)
    else:
        result = train.train_and_evaluate(c, _WORKDIR.value)
        logging.info("Result: %s", result)


if __name__ == "__main__":
    app.run(main)
