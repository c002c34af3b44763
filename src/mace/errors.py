"""Errors mace reports to users: one line that names the problem, a hint that names the fix,
and a distinct exit status per kind of problem (scripts branch on them).

EXIT_CODES is the one list of exit statuses; the command line's help is generated from it
and from the first line of each class's docstring."""

from __future__ import annotations


class MaceError(Exception):
    """A problem the user can fix that no other status names.

    `str()` is the one-line message; `hint` says what to do.  Each subclass is a kind of
    problem with its own exit status (`exit_code`)."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def oneline(self) -> str:
        msg = str(self)
        return f"{msg} ({self.hint})" if self.hint else msg


class UsageError(MaceError):
    """Usage: a bad option or argument."""
    exit_code = 2


class PermissionProblem(MaceError):
    """Permission: mace needs root (or CAP_SYS_ADMIN, CAP_SYS_PTRACE and CAP_IPC_LOCK)."""
    exit_code = 3


class TracefsError(MaceError):
    """Tracefs: not mounted or not readable."""
    exit_code = 4


class TracepointMissing(MaceError):
    """Tracepoint missing: this kernel lacks one mace needs."""
    exit_code = 5


class TargetNotFound(MaceError):
    """Target not found (for a service client: measurement is not enabled here)."""
    exit_code = 6


class TopologyError(MaceError):
    """Topology: no veth path from the container to the host."""
    exit_code = 7


class UplinkMissing(MaceError):
    """Uplink missing: the host has no such device, or no default route."""
    exit_code = 8


class ResourceError(MaceError):
    """Resources: limits, memory, a missing tool, or the socket already taken."""
    exit_code = 9


class ServiceUnreachable(MaceError):
    """Service unreachable: `mace on|off|status|read` cannot talk to `mace serve`."""
    exit_code = 10


class ServiceRefused(MaceError):
    """Refused: `mace serve` refused a request for a reason no other status names."""
    exit_code = 11


class RuntimeUnavailable(MaceError):
    """Runtime unavailable: the container runtime's socket is absent, refuses, or denies us."""
    exit_code = 12


class ContainerNotFound(MaceError):
    """Container not found: the runtime knows no container or pod by that name or id."""
    exit_code = 13


class ContainerNotRunning(MaceError):
    """Container not running: it exists, but no process of it holds a network namespace."""
    exit_code = 14


class NoContainerNetwork(MaceError):
    """No container network: it uses the host's network, or none at all."""
    exit_code = 15


class NoOwnCgroup(MaceError):
    """No cgroup of its own: the socket segment follows a container's processes by it."""
    exit_code = 16


EXIT_CODES = {cls.__name__: cls.exit_code for cls in
              (MaceError, UsageError, PermissionProblem, TracefsError, TracepointMissing,
               TargetNotFound, TopologyError, UplinkMissing, ResourceError, ServiceUnreachable,
               ServiceRefused, RuntimeUnavailable, ContainerNotFound, ContainerNotRunning,
               NoContainerNetwork, NoOwnCgroup)}


def meaning(name: str) -> str:
    """The one-line meaning of an exit status, from its class's docstring."""
    return globals()[name].__doc__.strip().splitlines()[0]


def exit_status_text(names=None, done: str = "done") -> str:
    """The "exit status" part of a help text: 0 (`done`), then each class of `names` (all of
    EXIT_CODES by default) with its number and meaning."""
    rows = [(0, done)] + [(EXIT_CODES[n], meaning(n)) for n in (names or EXIT_CODES)]
    return "exit status:\n" + "".join(f"  {code:>2}  {text}\n" for code, text in sorted(rows))
