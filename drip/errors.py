"""Drip's error types.

Every error a user can cause is a ``DripError`` whose message is one line that names the value,
what was expected and how to fix it. The CLI prints that line and exits non-zero; anything else
that escapes is a bug in Drip and keeps its traceback (``guarded`` draws that line).
"""

import sys


class DripError(Exception):
    """Base class: a problem the user can fix. ``str(error)`` is the whole message."""

    exit_code = 2


class ConfigError(DripError):
    """A flag or a ``pipeline.config`` value is unknown or out of range."""


class InputError(DripError):
    """An image, an annotation file or a label map cannot be used as given."""


class SessionError(DripError):
    """The session folder is missing something a stage needs, or is in the wrong state."""


class ModelError(DripError):
    """A network name, weights file or exported model cannot be loaded."""


class DownloadError(ModelError):
    """Starting weights could not be downloaded (offline, a proxy, a bad hash). ``what_failed`` is
    the message without the advice, for a caller that handles the failure itself."""

    def __init__(self, message: str, what_failed: str = ""):
        super().__init__(message)
        self.what_failed = what_failed or message


class Interrupted(DripError):
    """The user stopped the run (Ctrl-C or SIGTERM) after Drip saved its work."""

    exit_code = 130


class DistributedError(DripError):
    """The process group failed: a rank died, hung, or the machines could not meet; or one of
    ``drip audit``'s fold processes failed."""

    exit_code = 1


def guarded(fn, *args) -> int:
    """Run ``fn``; a DripError becomes one line on stderr and its exit code, never a traceback."""
    try:
        return fn(*args)
    except DripError as exc:
        print(f"drip: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("drip: interrupted", file=sys.stderr)
        return 130
