"""Defaults shared by the command line, the tracer and the service.

Plain constants and the standard library only: `mace on|off|status|read` runs inside
containers and builds its command line from this module without loading the engine
(the compiled modules, pyroute2).
"""

from __future__ import annotations

DIRECTIONS = ("egress", "ingress")      # by a report's `dir`, as the correlator numbers them
FORMATS = ("mace", "jsonl", "csv")      # `mace trace --format`
SEGMENTS = ("device", "socket")         # `--segment`: what a report's latency measures

DEFAULT_TABLE_SIZE = 1 << 16            # correlation table entries, 64 bytes each
DEFAULT_MAX_AGE_NS = 1_000_000_000      # a packet not through after this long is given up

DEFAULT_SOCKET = "/run/mace/mace.sock"
SOCKET_ENV = "MACE_SOCKET"
DEFAULT_QUEUE = 65536                   # reports kept per namespace for its readers
DEFAULT_MAX_NAMESPACES = 4096           # filters no longer bound it (prefix globs, names split over
                                        # events); device slots are int16
DEFAULT_MAX_CLIENTS = 1024
DEFAULT_STATE_DIR = "/var/lib/mace"     # root's only: never the directory containers mount
PRESENCE_EVERY = 1.0                    # s between checks that traced containers still exist

# What one tracepoint hit costs the CPU it runs on, for the summary's estimate of mace's own
# cost inside its segments.  Measured on the VM these defaults were chosen on (see
# /work/shared/design/KERNEL-NOTES.md, "What one sample costs here"): a sample of a net
# tracepoint (its record is tens of bytes plus the device name) about 1 µs; a hit that the
# event's filter rejects about 170 ns, because the kernel builds the record before filtering.
SAMPLE_COST_NS = 1000
FILTERED_HIT_COST_NS = 170
# and every hit of a filtered tracepoint, sampled or not, walks the filter's terms one by
# one (about 31 ns each after the first) and every perf event of it (about 46 ns each after
# the first): benchmarks/sample_cost.py, "name filters"
FILTER_TERM_COST_NS = 31
EXTRA_EVENT_COST_NS = 46
