"""mace: per-packet latency that container network isolation adds, from kernel tracepoints.

The public API lives in submodules: `mace.capture.perf` (capture engine), `mace.testing.testbed`
(throwaway namespace topologies), `mace.capture.tracefs` (tracepoint layouts).  The compiled hot
loop, `mace.capture._ring`, is private.
"""

from mace._version import __version__
from mace.errors import MaceError

__all__ = ["__version__", "MaceError"]
