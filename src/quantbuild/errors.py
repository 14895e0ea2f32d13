"""The errors a user can cause, each a one-line message and a distinct exit code.

The CLI and every stage catch `QuantbuildError` at the edge and print `str(err)` alone:
no traceback for problems that are the user's input, not our bug.
"""


class QuantbuildError(Exception):
    """Base class: a problem with the user's input or environment."""

    exit_code = 1


class ConfigError(QuantbuildError):
    """A config value is missing, of the wrong type, unknown or out of range."""


class DataError(QuantbuildError):
    """A data file (eval or calibration JSONL) is missing, empty or malformed."""


class IntegrityError(QuantbuildError):
    """Bytes on disk do not match their recorded digest, or a file is unsafe to load."""


class DriftError(QuantbuildError):
    """The environment differs from the one an artifact was validated on."""

    exit_code = 2


class RuntimeUnavailable(QuantbuildError):
    """The runtime a variant deploys on is not installed or not built on this machine."""


class DiskFull(QuantbuildError):
    """A write found no space left on its device (ENOSPC, or EDQUOT: a quota)."""


class GateError(QuantbuildError):
    """No variant passes the release gate."""
