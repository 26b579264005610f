"""The errors that are the user's to fix (a flag, a config value, a path, a file): entry points print them as one
line and exit with status 2. Any other exception is a bug and keeps its traceback."""

# "Stopped; run the same command again to resume" (sysexits' EX_TEMPFAIL), after SIGTERM/SIGINT: launch scripts
# requeue on it. 0 is a finished run, 2 a usage error, anything else a failure.
EXIT_RESUME = 75


class UserError(Exception):
    """A problem with what the user asked for; the message says what was given and what is expected."""


class ConfigError(UserError, ValueError):
    """A config value or flag that cannot work (the message names the field)."""


class PathError(UserError, FileNotFoundError):
    """A path the config or a flag names that does not exist or holds nothing usable."""


class FileFormatError(UserError, ValueError):
    """A file that exists but is not what it should be (e.g. not a PyTorch checkpoint)."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss or gradient; entry points print the message (the step and the loss
    terms) as one line and exit with status 1. Not a bug, and not the user's input."""
