"""mace: per-packet latency that container network isolation adds, from kernel tracepoints.

The library face, for a program that measures containers itself::

    import mace

    targets = [mace.resolve("1234"), mace.resolve("web")]   # a PID, a netns name or path
    topo = mace.discover(targets)                           # their veth paths to the uplink
    with mace.Tracer(topo.plan()) as tracer:
        tracer.start()
        tracer.follow(until=lambda: done, on_reports=print, presence=topo.present)
        tail = tracer.stop()
        print(tracer.stats())

Each `mace.Report` is one packet's crossing of the measured segment in one direction
(`container`, `direction`, `seq`, `latency` in ns, ...).  Errors a user can fix are
`mace.MaceError` subclasses: a one-line message, a `hint`, an `exit_code`.

Names are loaded on first use: `import mace` alone loads neither the compiled modules nor
pyroute2, so the service's client (`mace on|off|status|read`) stays light.
"""

from __future__ import annotations

import importlib

from mace._version import __version__

_ERRORS = ("MaceError", "UsageError", "PermissionProblem", "TracefsError", "TracepointMissing",
           "TargetNotFound", "TopologyError", "UplinkMissing", "ResourceError",
           "ServiceUnreachable", "ServiceRefused", "RuntimeUnavailable", "ContainerNotFound",
           "ContainerNotRunning", "NoContainerNetwork", "NoOwnCgroup")

# name -> the module that defines it
_FACE = {
    "Tracer": "mace.tracer",
    "Plan": "mace.plan",
    "ContainerPath": "mace.plan",
    "discover": "mace.targets.netns",
    "resolve": "mace.targets.netns",
    "Report": "mace.output.report",
    **{name: "mace.errors" for name in _ERRORS},
}

__all__ = ["__version__", *_FACE]


def __getattr__(name: str):
    module = _FACE.get(name)
    if module is None:
        raise AttributeError(f"module 'mace' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value         # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
