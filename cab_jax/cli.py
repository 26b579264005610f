"""What the command lines (``main``, ``convert``, ``generate``) share: ``--help`` that exits 0, mistakes in flags,
config files and overrides, and the user's errors (:class:`cab_jax.errors.UserError`), each as one line on stderr
with exit status 2, and a log without library noise. Any other exception keeps its traceback."""

from __future__ import annotations

import logging as std_logging
import pathlib
import re
import sys
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_dict

from cab_jax.errors import DivergedError, UserError

USAGE_ERROR = 2  # exit status for a usage error, as argparse and most Unix tools use
_HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")

# Library log lines a normal run does not need, by the file that logs them and the start of the message. Each is
# dropped at the absl handler; every other line, warnings of these libraries included, passes.
_NOISE = (
    ("xla_bridge.py", "Unable to initialize backend"),  # JAX probing for accelerators it does not find
    ("dataset_info.py", "Load dataset info from"),  # TFDS, on every builder it opens
    ("dataset_info.py", "For '"),  # "fields info.[description, ...] differ on disk and in the code" (fake ImageNet)
    ("dataset_builder.py", "Generating dataset"),
    ("dataset_builder.py", "Using custom data configuration"),  # our builders' configs are made per setting
    ("file_utils.py", "Variant folder"),  # TFDS, while an embedded dataset is being built
    ("writer.py", "Done writing"),
    ("checkpoint_manager.py", "CheckpointManagerOptions.read_only=True"),  # orbax, on every read-only load
    ("checkpoint_manager.py", "Given directory is read only"),
)


def _library_noise(record: std_logging.LogRecord) -> bool:
    if "orbax" in record.pathname and record.levelno < std_logging.WARNING:  # orbax's per-save INFO lines
        return True
    message = str(record.msg)
    return any(record.pathname.endswith(file) and message.startswith(start) for file, start in _NOISE)


def quiet_library_logs() -> None:
    """Drop the log lines in ``_NOISE`` (and orbax's INFO lines); TFDS's progress bars are turned off (they
    write escape codes into log files)."""
    import tensorflow_datasets as tfds

    logging.get_absl_handler().python_handler.addFilter(lambda record: not _library_noise(record))
    tfds.disable_progress_bar()


def fail(message: str, status: int = USAGE_ERROR) -> None:
    """Print ``error: message`` (one line) to stderr and exit with ``status`` (a usage error unless given)."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(status)


def run(main: Callable[[list[str]], None]) -> None:
    """``absl.app.run(main)`` with the behaviour of the module docstring."""

    def guarded(argv: list[str]) -> None:
        quiet_library_logs()
        try:
            main(argv)
        except UserError as e:
            fail(str(e))
        except DivergedError as e:
            fail(str(e), status=1)

    app.run(guarded, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with ``--help`` exiting 0 and every parsing mistake reported as one line."""
    if any(arg in _HELP_FLAGS for arg in argv[1:]):
        app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True, exitcode=0)
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        fail(_flag_error(e))
    except (KeyError, AttributeError) as e:  # an override of a field the config does not have
        fail(_unknown_field(e, argv))
    except UserError as e:  # a config variant (configs/NAME.py:key=value) that does not parse
        fail(str(e))
    if "config" in flags.FLAGS:
        _check_config_loaded(flags.FLAGS["config"])
    return rest


def _flag_error(error: flags.Error) -> str:
    """The message of a flag error; for an error raised while a config file ran, the one line of our own error
    (a bad variant), or, for anything else, the whole traceback absl folded into the message (a bug to see)."""
    text = str(error)
    if "Error whilst parsing config file" not in text:
        return text
    ours = re.search(r"cab_jax\.errors\.\w+: (.*)$", text.strip())
    if ours is None:
        print(text, file=sys.stderr)
        sys.exit(1)
    return f"{text.split(':', 1)[0].removeprefix('flag ')}: {ours.group(1)}"


def _check_config_loaded(flag: flags.Flag) -> None:
    """A config file that could not be read is only reported when the config is used: report it now."""
    if flag.value is None or isinstance(flag.value, config_dict.ConfigDict):
        return
    try:
        flag.value.task  # noqa: B018  (an unreadable config raises on any attribute)
    except OSError as e:
        path = flag.serialize().split("=", 1)[-1].split(":", 1)[0]
        fail(f"--config={path}: " + ("no such file" if not pathlib.Path(path).exists() else
                                     f"cannot read it ({e.__cause__ or e})"))


def _unknown_field(error: BaseException, argv: list[str]) -> str:
    """'--config.trian.steps=5: the config has no field 'trian'; did you mean 'train'?' from ml_collections'
    KeyError (wrapped in an AttributeError for nested fields)."""
    while isinstance(error, AttributeError) and error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    found = re.match(r"""['"]?([^'"\n]+)['"]?""", text)
    key = found.group(1) if found else text
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    flag = next((arg for arg in argv if arg.startswith("--config.") and f".{key}" in arg.split("=", 1)[0]), None)
    where = f"{flag}: " if flag else ""
    hint = f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""
    return f"{where}the config has no field {key!r}{hint}"
