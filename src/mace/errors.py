"""Errors mace reports to users: one line that names the problem, a hint that names the fix,
and a distinct exit status per kind of problem (scripts branch on them)."""

from __future__ import annotations


class MaceError(Exception):
    """A problem the user can fix.  `str()` is the one-line message; `hint` says what to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def oneline(self) -> str:
        msg = str(self)
        return f"{msg} ({self.hint})" if self.hint else msg


class UsageError(MaceError):
    exit_code = 2


class PermissionProblem(MaceError):
    exit_code = 3


class TracefsError(MaceError):
    exit_code = 4


class TracepointMissing(MaceError):
    exit_code = 5


class TargetNotFound(MaceError):
    exit_code = 6


class TopologyError(MaceError):
    exit_code = 7


class UplinkMissing(MaceError):
    exit_code = 8


class ResourceError(MaceError):
    exit_code = 9


class ServiceUnreachable(MaceError):
    """`mace on|off|status|read` cannot talk to `mace serve`."""
    exit_code = 10


class ServiceRefused(MaceError):
    """`mace serve` refused a request for a reason no other status names."""
    exit_code = 11


EXIT_CODES = {cls.__name__: cls.exit_code for cls in
              (MaceError, UsageError, PermissionProblem, TracefsError, TracepointMissing,
               TargetNotFound, TopologyError, UplinkMissing, ResourceError, ServiceUnreachable,
               ServiceRefused)}
