"""Type stubs for the compiled correlator (mace/correlate/_correlate.pyx)."""

from collections.abc import Iterable, Sequence

from typing_extensions import Buffer

from mace.capture._ring import EventSink

DEBUG: bool
"""Built with MACE_DEBUG=1: invariant checks abort the process on a fault."""
TYPES: dict[str, int]
"""Event type of each tracepoint the correlator follows (kind_types values)."""
CLASSES: dict[str, int]
"""Device class bits (dev_classes values)."""
CONTAINER_COUNTERS: tuple[str, ...]
GLOBAL_COUNTERS: tuple[str, ...]
DIRECTIONS: tuple[str, str]
SYNC_MAX_NS: int
FLUSH_MAX_NS: int
ANSWERS_KEPT: int
ETH_HLEN: int
ARP_L3: int
ARP_PAD_L3: int
ND_L3: int
NA_L3: int
CTX_BITS: int
PQ: int
CALLS: int
"""send calls in progress the correlator holds at once, direct-mapped by thread."""
REPORT_CAP: int
REPORT_FORMAT: str
"""struct layout of one packed report: t0 seq latency len container dir nhops cpu pad hop[HOPS]."""
HOPS: int
"""hop slots in a report."""
SEND_CALLS: tuple[str, ...]
"""the system calls a socket segment's egress starts in."""
HOP_SLOTS: tuple[int, int]
"""hop slots an egress and an ingress report use."""
REPORT_SIZE: int
ENTRY_SIZE: int
BUCKETS: int

def bucket_of(v: int) -> int: ...
def bucket_bounds(i: int) -> tuple[int, int]: ...

class Correlator(EventSink):
    def __init__(self, kind_types: Sequence[int], dev_classes: Sequence[int],
                 dev_containers: Sequence[int], inner_slots: Sequence[int], *,
                 table_size: int = 65536, max_age_ns: int = 1_000_000_000, hops: bool = False,
                 bridge: bool = True, end_at_queue: bool = False, ncpu: int = 256,
                 report_cap: int = 65536, probe_limit: int = 32) -> None: ...
    def reconfigure(self, dev_classes: Sequence[int], dev_containers: Sequence[int],
                    inner_slots: Sequence[int], reset: Iterable[int] = ()) -> int: ...
    def feed_bytes(self, data: Buffer) -> int: ...
    def take_reports(self) -> bytes: ...
    @property
    def pending_reports(self) -> int: ...
    def counters(self) -> dict: ...
    def histogram(self, container: int, direction: int) -> list[int]: ...
    def enable_buckets(self, bounds_ns: list[int], hops: bool = False) -> None: ...
    def buckets(self, container: int, direction: int) -> tuple[list[list[int]], list[int]]: ...
    def in_flight(self) -> list[list[int]]: ...
    def finish(self) -> list[list[int]]: ...
    @property
    def now(self) -> int: ...
