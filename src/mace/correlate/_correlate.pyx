# cython: language_level=3
"""Pair each packet's events into one latency report per direction, in fixed memory.

The correlator is an `EventSink`: `Rings.feed` hands it time-ordered events without the
GIL.  Packets are tracked in an open-addressed table keyed by skb address (linear probing,
backward-shift deletion, a bounded probe length, allocated once).  Each table entry walks
a path of steps; see mace.plan for the paths and the reasoning behind them.  In short:

    egress  E0 xmit inner -> [E1 netif_rx veth] -> E2 receive veth -> [E3 receive bridge]
            -> E4 queue uplink -> E5 xmit uplink
            (veth_start: E0 is not traced and E1 starts the entry, attributed at once)
    ingress I0 receive uplink -> [I1 xmit bridge] -> I2 xmit veth -> [I3 netif_rx inner]
            -> I4 receive inner

skb addresses are reused within microseconds, and some frees are invisible to tracepoints,
so an entry only advances when the next event is consistent with its packet:

- the event is one of the next steps of its path, on the right device (once the container
  is known: its own veth and its own inner device), with the same L3 length, not earlier
  than the last step;
- a *synchronous* step (one the kernel performs in the same call chain as the previous
  step, e.g. bridge -> routing -> dev_queue_xmit on the uplink) must come from the same CPU
  and thread, with no other packet's event on that CPU in between.  A packet that was
  delivered locally and freed silently cannot pass this: the next packet that reuses its
  address starts a new call chain;
- between *queued* steps (backlog, qdisc) the skb sits in a queue, from which it leaves
  only by the next step or a traced drop (skb:kfree_skb).

Anything else ends the entry and is counted.  Every report therefore has a consistent
event chain from start to end.
"""

from libc.stdint cimport INT16_MAX, SIZE_MAX, UINT64_MAX, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memmove, memset

from mace.includes.abi cimport MACE_ASSERT, MACE_DEBUG_ON, mace_event
from mace.capture._ring cimport EventSink

cdef enum:
    T_NONE = 0
    T_XMIT = 1      # net:net_dev_start_xmit
    T_RECV = 2      # net:netif_receive_skb
    T_RX = 3        # net:netif_rx
    T_QUEUE = 4     # net:net_dev_queue
    T_FREE = 5      # skb:kfree_skb
    T_ROUTE = 6     # fib:fib_table_lookup: a routing decision, no skb (see _route)
    T_CALL = 7      # syscalls:sys_enter_<send call>: a thread begins sending (socket segment)
    T_RETURN = 8    # syscalls:sys_exit_<send call>: ... and is done
    T_READY = 9     # sock:sk_data_ready: a packet joins a socket's queue (key: the socket)
    T_RECEIVED = 10 # sock:sock_recv_length: a receive call (read, recv*) took one (key: the socket)

    C_INNER = 1     # a container's own device (ambiguous name: every container has eth0)
    C_VETH = 2      # host-side veth of a monitored container (unique name)
    C_BRIDGE = 4
    C_UPLINK = 8

    EGRESS = 0
    INGRESS = 1

    NB = 1792       # histogram buckets, see _bucket
    PMR = MACE_HOPS + 2     # rows of caller-given buckets: the latency, MACE_HOPS hop slots, the end

    # per container and direction
    CC_CROSSED = 0
    CC_REPORTS = 1
    CC_LOCAL = 2
    CC_DROPPED = 3
    CC_ORPHANS = 4
    CC_EXPIRED = 5
    CC_EVICTED = 6
    CC_REJECTED = 7
    CC_UNPAIRED = 8     # socket segment: no send or receive call of the container's took it
    NCC = 9

    # global
    G_EVENTS = 0
    G_FREES = 1
    G_UNCLAIMED = 2
    G_FOREIGN = 3
    G_STALE = 4
    G_EVICTED = 5
    G_NONIP = 6
    G_SUPERSEDED = 7
    G_INSERTS = 8
    G_IGNORED = 9
    G_MAXPROBE = 10
    G_PARKED = 11
    G_PQ_OVERFLOW = 12
    G_ROUTE_UNCLAIMED = 13
    G_SOCK_UNCLAIMED = 14   # a socket's data_ready with no packet of ours pending there
    G_RECV_UNPAIRED = 15    # a receive call with no packet of ours queued for it
    NG = 16

    F_ACCOUNTED = 1     # entry flag: _conflict accounted for the event itself
    F_PARKED = 2        # entry flag: waiting for neighbour resolution (ARP, ND)
    F_QUEUED = 4        # ... behind another packet that asked for it
    F_IPV6 = 8          # queued in a socket: an IPv6 packet (its header is not the IPv4 one)
    ETH_P_ARP = 0x0806
    ETH_P_IPV6 = 0x86DD
    SYNC_MAX = 20000000 # ns: a call chain longer than this is not one (a parked packet may wait)
    FLUSH_MAX = 1000000 # ns: a neighbour queue is flushed in the answer's call chain, right after it


# The rules the reference model (mace.testing.reference) must share: Python sees these.
cpdef enum:
    ETH_HLEN = 14
    ARP_L3 = 28         # an ARP request or reply for IPv4 over Ethernet, without the Ethernet header
    ND_L3 = 72          # an IPv6 neighbour solicitation (or advertisement) with its link-layer option
    NA_L3 = 64          # an IPv6 neighbour advertisement without one (an answer to a unicast probe)
    ARP_PAD_L3 = 46     # an ARP reply padded to Ethernet's 60-byte minimum, as a NIC receives it
    CTX_BITS = 0x58     # common_flags: NMI 0x40, softirq 0x10, hardirq 0x08
    PQ = 64             # a CPU's pending call chains: NAPI handles up to 64 packets a batch
    CALLS = 4096        # threads in a send call at once, direct-mapped (a collision: unpaired)

cdef enum:
    SOCKS_MIN = 256     # sockets with packets queued at once (see _sock)
    SOCK_PROBES = 16
    MSG_PEEK = 2        # a receive that leaves the packet queued
    MSG_ERRQUEUE = 0x2000   # a receive from the socket's error queue, not its packets
    IPPROTO_TCP = 6     # a stream: its receives take bytes, not packets
    IPPROTO_UDP = 17    # its datagram's payload follows an 8-byte header

# The system calls a socket segment's egress starts in: every call that sends on a socket
SEND_CALLS = ("sendto", "sendmsg", "sendmmsg", "write", "writev")
TYPES = {"net:net_dev_start_xmit": T_XMIT, "net:netif_receive_skb": T_RECV,
         "net:netif_rx": T_RX, "net:netif_rx_entry": T_RX, "net:net_dev_queue": T_QUEUE,
         "skb:kfree_skb": T_FREE, "fib:fib_table_lookup": T_ROUTE,
         **{f"syscalls:sys_enter_{c}": T_CALL for c in SEND_CALLS},
         **{f"syscalls:sys_exit_{c}": T_RETURN for c in SEND_CALLS},
         "sock:sk_data_ready": T_READY, "sock:sock_recv_length": T_RECEIVED}
CLASSES = {"inner": C_INNER, "veth": C_VETH, "bridge": C_BRIDGE, "uplink": C_UPLINK}
CONTAINER_COUNTERS = ("crossed", "reports", "local", "dropped", "orphans", "expired",
                      "evicted", "rejected", "unpaired")
GLOBAL_COUNTERS = ("events", "frees", "unclaimed", "foreign", "stale", "evicted",
                   "nonip", "superseded", "inserts", "ignored", "max_probe", "parked",
                   "pending_overflow", "route_unclaimed", "sock_unclaimed", "recv_unpaired")
SYNC_MAX_NS = SYNC_MAX
FLUSH_MAX_NS = FLUSH_MAX
ANSWERS_KEPT = ANSWERS
REPORT_CAP = 65536
DIRECTIONS = ("egress", "ingress")
REPORT_FORMAT = f"=QQIIHBBHH{MACE_HOPS}I"     # mace_report (t0 seq latency len container dir nhops cpu pad hop[])
HOPS = MACE_HOPS
HOP_SLOTS = (5, 4)      # hop slots each direction's reports carry (see _plan)
REPORT_SIZE = sizeof(mace_report)
ENTRY_SIZE = sizeof(mace_entry)
BUCKETS = NB
DEBUG = bool(MACE_DEBUG_ON)     # built with MACE_DEBUG=1: invariant checks abort on a fault


cdef extern from *:
    int __builtin_clz(unsigned int x) nogil


cdef inline bint _is_ip(uint16_t proto) noexcept nogil:
    return proto == 0x0800 or proto == 0x86DD


cdef inline uint32_t _bucket(uint64_t v) noexcept nogil:
    # Log-linear: exact below 128 ns, then 64 buckets per power of two (< 1.6 % wide).
    cdef uint32_t k
    if v < 128:
        return <uint32_t>v
    if v > 0xFFFFFFFFULL:
        v = 0xFFFFFFFFULL
    k = 32 - __builtin_clz(<unsigned int>v) - 7
    return 128 + (k - 1) * 64 + <uint32_t>((v >> k) - 64)


cdef inline int _pm_bucket(const uint64_t *bounds, int n, uint64_t v) noexcept nogil:
    # the first bucket whose inclusive upper bound holds v; n (+Inf) past the last
    cdef int lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if v <= bounds[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


cdef void *_grow(void *p, size_t old, size_t n, size_t size) except NULL:
    # realloc that zeroes the new part and leaves `p` alone on failure
    cdef void *q = calloc(max(n, 1), size)
    if q == NULL:
        raise MemoryError()
    if p != NULL:
        memcpy(q, p, old * size)
        free(p)
    return q


cdef inline uint64_t _queued_key(uint64_t sk, uint32_t gen, uint32_t seq) noexcept nogil:
    # A packet in a socket's queue: its key mixes the socket, which of the slot's sockets it
    # is (a socket that lost its slot and came back numbers its packets from 0 again) and
    # its place there, and is odd, which no skb address is
    cdef uint64_t x = sk ^ ((<uint64_t>gen << 32 | seq) * 0x9E3779B97F4A7C15ULL)
    x ^= x >> 31
    x *= 0xBF58476D1CE4E5B9ULL
    x ^= x >> 29
    return x | 1


cdef inline bint _payload_fits(uint32_t ret, uint32_t l3, uint16_t proto, bint ipv6) noexcept nogil:
    # What a receive returns of a datagram of l3 bytes: all of it (a raw IPv4 socket), or
    # what follows the IP header (IPv4: 20..60 bytes in steps of 4; IPv6: 40 and extension
    # headers in steps of 8) and, for UDP, its 8-byte header
    cdef uint32_t h
    if ret > l3:
        return False
    h = l3 - ret
    if proto == IPPROTO_UDP:
        if h < 8:
            return False
        h -= 8
    elif h == 0 and not ipv6:
        return True
    if ipv6:
        return 40 <= h <= 512 and h % 8 == 0
    return 20 <= h <= 60 and h % 4 == 0


def bucket_of(v):
    """Histogram bucket of a latency in ns."""
    return _bucket(v)


def bucket_bounds(int i):
    """[low, high) in ns of histogram bucket i."""
    if i < 128:
        return i, i + 1
    k = (i - 128) // 64 + 1
    m = (i - 128) % 64 + 64
    return m << k, (m + 1) << k


cdef class Correlator(EventSink):
    """Turns time-ordered kernel events into per-packet latency reports.

    kind_types: per capture kind, one of TYPES (by tracepoint name) or 0 to ignore.
    dev_classes: per device slot, OR of CLASSES bits.  dev_containers: per device slot, the
    container whose veth it is (-1 otherwise).  inner_slots: per container, the slot of its
    inner device.  table_size: entries, a power of two.  max_age_ns: a packet older than
    this is given up (at most 4 s).  hops/bridge: whether the intermediate steps are traced.
    end_at_queue: end egress at net_dev_queue on the uplink (for uplinks that segment).
    ncpu: highest CPU number + 1.  report_cap: reports held until take_reports() (consume()
    stops taking events while the buffer is full).
    """

    def __cinit__(self):
        self.table = NULL
        self.kind_type = NULL
        self.dev_class = NULL
        self.dev_container = NULL
        self.inner_of = NULL
        self.ccount = NULL
        self.gcount = NULL
        self.hist = NULL
        self.lat_min = NULL
        self.lat_max = NULL
        self.lat_sum = NULL
        self.seq = NULL
        self.pm = NULL
        self.pm_sum = NULL
        self.pm_nb = -1
        self.pm_hops = False
        self.pq_skb = NULL
        self.pq_ts = NULL
        self.pq_n = NULL
        self.notes = NULL
        self.calls = NULL
        self.socks = NULL
        self.reports = NULL
        self.ghost = NULL
        self.spill = bytearray()

    def __init__(self, kind_types, dev_classes, dev_containers, inner_slots, *,
                 uint64_t table_size=65536, uint64_t max_age_ns=1_000_000_000, bint hops=False,
                 bint bridge=True, bint end_at_queue=False, int ncpu=256, size_t report_cap=REPORT_CAP,
                 int probe_limit=32, bint veth_start=False, bint route=False, bint socket=False):
        cdef int i
        if table_size < 2 or table_size & (table_size - 1):
            raise ValueError(f"table size must be a power of two >= 2, not {table_size}")
        if not 0 < max_age_ns <= 4_000_000_000:
            raise ValueError("max age must be between 1 ns and 4 s")
        if probe_limit < 1 or ncpu < 1:
            raise ValueError("probe_limit and ncpu must be at least 1")
        if socket and not veth_start:
            raise ValueError("the socket segment starts egress at the veth (veth_start)")
        for t in kind_types:
            if not 0 <= t <= T_RECEIVED:
                raise ValueError(f"unknown event type {t}")
        if report_cap < 1:
            raise ValueError("report_cap must be at least 1")
        # malloc(report_cap * size) of a product that wraps would return a small buffer
        if report_cap > SIZE_MAX // sizeof(mace_report):
            raise OverflowError(f"{report_cap} reports do not fit the address space")
        self.cap = table_size
        self.bits = table_size.bit_length() - 1
        self.probe_limit = <uint32_t>min(probe_limit, table_size)
        self.max_age = max_age_ns
        self.nkinds = len(kind_types)
        self.ncpu = ncpu
        self.report_cap = report_cap        # consume() stops before it would overflow
        self.table = <mace_entry *>calloc(self.cap, sizeof(mace_entry))
        self.kind_type = <uint8_t *>calloc(max(self.nkinds, 1), 1)
        self.gcount = <uint64_t *>calloc(NG, sizeof(uint64_t))
        self.pq_skb = <uint64_t *>calloc(ncpu * PQ, sizeof(uint64_t))
        self.pq_ts = <uint64_t *>calloc(ncpu * PQ, sizeof(uint64_t))
        self.pq_n = <int *>calloc(ncpu, sizeof(int))
        self.notes = <cpu_note_t *>calloc(ncpu, sizeof(cpu_note_t))
        self.calls_mask = CALLS - 1
        self.calls = <send_call_t *>calloc(CALLS, sizeof(send_call_t))
        # a socket per sixteen packets in flight; at least SOCKS_MIN
        self.socks_mask = <uint32_t>max(SOCKS_MIN, table_size // 16) - 1
        self.socks = <sock_queue_t *>calloc(self.socks_mask + 1, sizeof(sock_queue_t))
        self.reports = <mace_report *>malloc(self.report_cap * sizeof(mace_report))
        self.ghost_mask = max(64, self.cap // 4) - 1
        self.ghost = <uint64_t *>calloc(self.ghost_mask + 1, sizeof(uint64_t))
        if (self.table == NULL or self.kind_type == NULL or self.gcount == NULL
                or self.pq_skb == NULL or self.pq_ts == NULL or self.pq_n == NULL or self.notes == NULL
                or self.calls == NULL or self.socks == NULL
                or self.reports == NULL or self.ghost == NULL):
            raise MemoryError()
        for i, t in enumerate(kind_types):
            self.kind_type[i] = t
        self._configure(dev_classes, dev_containers, inner_slots)
        self._plan(hops, bridge, end_at_queue, veth_start, route, socket)

    def reconfigure(self, dev_classes, dev_containers, inner_slots, reset=()):
        """Change the devices and containers between two events (no thread may be feeding).

        Same arguments as the constructor; a container whose inner slot is -1 is unused.
        Containers in `reset` start afresh: their packets still in the table are forgotten
        and their counters, histograms and sequence numbers return to zero.  Device slots
        and container indexes may grow, never shrink.  Returns the entries forgotten."""
        cdef uint64_t i, k, mask = self.cap - 1, forgotten = 0
        cdef int c, d
        cdef uint8_t *old_class = self.dev_class
        cdef int nold = self.ndevs
        cdef uint8_t *gone
        if len(dev_classes) < self.ndevs or len(inner_slots) < self.ncont:
            raise ValueError("device slots and containers can grow, never shrink")
        for c in reset:
            if not 0 <= c < len(inner_slots):
                raise ValueError(f"cannot reset container {c} of {len(inner_slots)}")
        # a slot whose class changed may be a start device that now means another thing:
        # entries that began there belong to the old configuration
        gone = <uint8_t *>calloc(max(nold, 1), 1)
        if gone == NULL:
            raise MemoryError()
        try:
            for c in range(nold):
                gone[c] = old_class[c]
            self.dev_class = NULL             # _configure allocates afresh
            try:
                self._configure(dev_classes, dev_containers, inner_slots)
            except BaseException:
                free(self.dev_class)
                self.dev_class = old_class
                raise
            free(old_class)
            for c in range(nold):
                gone[c] = gone[c] != self.dev_class[c]
            resets = set(reset)
            i = 0
            k = 0
            while k < self.cap:
                if self.table[i].skb and (
                        (self.table[i].container >= 0 and self.table[i].container in resets)
                        or (0 <= self.table[i].start_dev < nold and gone[self.table[i].start_dev])):
                    self._delete(i)             # slot i may now hold a shifted entry
                    forgotten += 1
                else:
                    i = (i + 1) & mask
                    k += 1
        finally:
            free(gone)
        for c in reset:
            for d in range(2):
                self._zero(c * 2 + d)
        return forgotten

    cdef void _zero(self, int cd) noexcept:
        memset(&self.ccount[cd * NCC], 0, NCC * sizeof(uint64_t))
        memset(&self.hist[cd * NB], 0, NB * sizeof(uint64_t))
        self.lat_min[cd] = UINT64_MAX
        self.lat_max[cd] = 0
        self.lat_sum[cd] = 0
        self.seq[cd] = 0
        if self.pm != NULL:
            memset(&self.pm[cd * PMR * (self.pm_nb + 1)], 0, PMR * (self.pm_nb + 1) * sizeof(uint64_t))
            memset(&self.pm_sum[cd * PMR], 0, PMR * sizeof(uint64_t))

    cdef int _configure(self, dev_classes, dev_containers, inner_slots) except -1:
        # (Re)builds the per-device tables and grows the per-container ones, keeping counts.
        cdef int i, n = len(inner_slots), old = self.ncont, nd = len(dev_classes)
        if len(dev_classes) != len(dev_containers):
            raise ValueError("dev_classes and dev_containers differ in length")
        if n > INT16_MAX or nd > INT16_MAX:
            raise ValueError("too many containers or devices")
        for i, (c, owner) in enumerate(zip(dev_classes, dev_containers)):
            # the hot loop indexes counters by these: a veth must name its container
            if not -1 <= owner < n or bool(c & C_VETH) != (owner >= 0):
                raise ValueError(f"device slot {i}: class {c} and container {owner} disagree")
            if owner >= 0 and not 0 <= inner_slots[owner] < nd:
                raise ValueError(f"container {owner} has no inner device slot")
        for i, s in enumerate(inner_slots):
            if not -1 <= s < nd:
                raise ValueError(f"container {i} has no inner device slot")
        cdef uint8_t *cls = <uint8_t *>calloc(max(nd, 1), 1)
        cdef int16_t *owner_of = <int16_t *>calloc(max(nd, 1), sizeof(int16_t))
        cdef int16_t *inner = <int16_t *>calloc(max(n, 1), sizeof(int16_t))
        if cls == NULL or owner_of == NULL or inner == NULL:
            free(cls)
            free(owner_of)
            free(inner)
            raise MemoryError()
        if n > old:
            try:
                self.ccount = <uint64_t *>_grow(self.ccount, old * 2 * NCC, n * 2 * NCC, sizeof(uint64_t))
                self.hist = <uint64_t *>_grow(self.hist, old * 2 * NB, n * 2 * NB, sizeof(uint64_t))
                self.lat_min = <uint64_t *>_grow(self.lat_min, old * 2, n * 2, sizeof(uint64_t))
                self.lat_max = <uint64_t *>_grow(self.lat_max, old * 2, n * 2, sizeof(uint64_t))
                self.lat_sum = <uint64_t *>_grow(self.lat_sum, old * 2, n * 2, sizeof(uint64_t))
                self.seq = <uint64_t *>_grow(self.seq, old * 2, n * 2, sizeof(uint64_t))
                if self.pm != NULL:
                    self.pm = <uint64_t *>_grow(self.pm, old * 2 * PMR * (self.pm_nb + 1),
                                                n * 2 * PMR * (self.pm_nb + 1), sizeof(uint64_t))
                    self.pm_sum = <uint64_t *>_grow(self.pm_sum, old * 2 * PMR, n * 2 * PMR,
                                                    sizeof(uint64_t))
            except MemoryError:
                free(cls)
                free(owner_of)
                free(inner)
                raise
            for i in range(old * 2, n * 2):
                self.lat_min[i] = UINT64_MAX
            self.ncont = n
        for i, c in enumerate(dev_classes):
            cls[i] = c
        for i, c in enumerate(dev_containers):
            owner_of[i] = c
        for i, s in enumerate(inner_slots):
            inner[i] = s
        free(self.dev_class)
        free(self.dev_container)
        free(self.inner_of)
        self.dev_class = cls
        self.dev_container = owner_of
        self.inner_of = inner
        self.ndevs = nd
        return 0

    def __dealloc__(self):
        free(self.table)
        free(self.kind_type)
        free(self.dev_class)
        free(self.dev_container)
        free(self.inner_of)
        free(self.ccount)
        free(self.gcount)
        free(self.hist)
        free(self.lat_min)
        free(self.lat_max)
        free(self.lat_sum)
        free(self.seq)
        free(self.pm)
        free(self.pm_sum)
        free(self.pq_skb)
        free(self.pq_ts)
        free(self.pq_n)
        free(self.notes)
        free(self.calls)
        free(self.socks)
        free(self.reports)
        free(self.ghost)

    cdef int _plan(self, bint hops, bint bridge, bint end_at_queue, bint veth_start,
                   bint route, bint socket) except -1:
        memset(self.steps, 0, sizeof(self.steps))
        self.veth_start = veth_start
        self.socket = socket
        # A T_ROUTE step is never an entry's step: it only times the routing decision inside
        # the synchronous chain between its neighbours (see _route), so no other step lists
        # it among its previous ones and the chain rules are those of the path without it.
        eg = [
            # type,   class,    prev steps,   sync,  traced,                attr,  end,          hop
            (T_XMIT,  C_INNER,  0,             False, not veth_start,        False, False,        -1),  # E0
            (T_RX,    C_VETH,   1 << 0,        True,  hops or veth_start,    True,  False,         0),  # E1
            (T_RECV,  C_VETH,   1 << 0 | 1 << 1, False, True,                True,  False,         1),  # E2
            (T_RECV,  C_BRIDGE, 1 << 2,        True,  hops and bridge,       False, False,         2),  # E3
            (T_ROUTE, C_UPLINK, 1 << 2 | 1 << 3, True, route,                False, False,         3),  # E4
            (T_QUEUE, C_UPLINK, 1 << 2 | 1 << 3, True, True,                 False, end_at_queue,
             -1 if end_at_queue else 4),                                                              # E5
            (T_XMIT,  C_UPLINK, 1 << 5,        False, not end_at_queue,      False, True,         -1),  # E6
        ]
        ing = [
            (T_RECV,  C_UPLINK, 0,             False, True,                  False, False,        -1),  # I0
            (T_ROUTE, C_BRIDGE | C_VETH, 1 << 0, True, route,                False, False,         0),  # I1
            (T_XMIT,  C_BRIDGE, 1 << 0,        True,  hops and bridge,       False, False,         1),  # I2
            (T_XMIT,  C_VETH,   1 << 0 | 1 << 2, True, True,                 True,  False,         2),  # I3
            (T_RX,    C_INNER,  1 << 3,        True,  hops,                  False, False,         3),  # I4
            (T_RECV,  C_INNER,  1 << 3 | 1 << 4, False, True,                False, not socket,
             4 if socket else -1),                                                                    # I5
        ]
        if socket:
            # The socket segment goes on: in the receive's call chain the packet joins a socket's
            # queue (no device: no class), and leaves it with a receive call (see _ready).
            ing += [
                (T_READY, 0,        1 << 5,        True,  True,                  False, False,        -1),  # I6
                (T_RECEIVED, 0,     1 << 6,        False, True,                  False, True,         -1),  # I7
            ]
        self.nhops[EGRESS] = 5
        self.nhops[INGRESS] = 5 if socket else 4
        for d, path in enumerate((eg, ing)):
            self.nsteps[d] = len(path)
            for i, (t, c, prev, sync, traced, attr, end, hop) in enumerate(path):
                self.steps[d][i].type = t
                self.steps[d][i].cls = c
                self.steps[d][i].prev = prev
                self.steps[d][i].sync = sync
                self.steps[d][i].traced = traced
                self.steps[d][i].attr = attr
                self.steps[d][i].end = end
                self.steps[d][i].hop = hop
        # the crossing of a container's boundary is counted at its first veth event
        self.boundary[EGRESS] = 1 if hops or veth_start else 2
        self.boundary[INGRESS] = 3
        return 0

    # -- table ------------------------------------------------------------------------------

    cdef uint64_t _home(self, uint64_t skb) noexcept nogil:
        # sk_buffs are slab objects: the low bits carry no information
        return ((skb >> 6) * 0x9E3779B97F4A7C15ULL) >> (64 - self.bits)

    cdef int64_t _lookup(self, uint64_t skb) noexcept nogil:
        cdef uint64_t mask = self.cap - 1, i = self._home(skb)
        cdef uint32_t k
        for k in range(self.probe_limit):
            if self.table[i].skb == skb:
                return <int64_t>i
            if self.table[i].skb == 0:
                return -1
            i = (i + 1) & mask
        return -1

    cdef mace_entry *_insert(self, uint64_t skb) noexcept nogil:
        # The caller knows skb is absent.  A full probe window gives up its oldest entry,
        # preferring one that expired, then one not yet attributed to a container.
        cdef uint64_t mask = self.cap - 1, i = self._home(skb), victim = 0
        cdef uint32_t k
        cdef int rank, best = 4
        cdef mace_entry *e
        for k in range(self.probe_limit):
            e = &self.table[i]
            if e.skb == 0:
                self.used += 1
                if k > self.gcount[G_MAXPROBE]:
                    self.gcount[G_MAXPROBE] = k
                break
            if self._expired(e):
                rank = 0
            elif e.container < 0:
                rank = 1
            else:
                rank = 2
            if rank < best or (rank == best and e.t0 < self.table[victim].t0):
                best = rank
                victim = i
            i = (i + 1) & mask
        else:
            e = &self.table[victim]
            if best == 0:
                self._retire(e, CC_EXPIRED)
            else:
                self._retire(e, CC_EVICTED)
                if e.container < 0 and e.dir == INGRESS:
                    # remember it: if it turns up at a veth, that is a miss, not host traffic
                    self.ghost[self._home(e.skb) & self.ghost_mask] = e.skb
        MACE_ASSERT(self.used <= self.cap, "table fill within its size")
        self.gcount[G_INSERTS] += 1
        memset(e, 0, sizeof(mace_entry))
        e.skb = skb
        return e

    cdef void _delete(self, uint64_t slot) noexcept nogil:
        # Backward-shift deletion: pull later entries of the cluster into the hole so that
        # lookups never need tombstones.
        # The hole is marked empty first, so the walk ends even in a full table.
        cdef uint64_t mask = self.cap - 1, i = slot, j = slot, h
        self.table[i].skb = 0
        while True:
            j = (j + 1) & mask
            if self.table[j].skb == 0:
                break
            h = self._home(self.table[j].skb)
            if ((j - h) & mask) >= ((j - i) & mask):
                self.table[i] = self.table[j]
                self.table[j].skb = 0
                i = j
        MACE_ASSERT(self.used > 0, "deleting from a table that holds entries")
        self.used -= 1

    cdef void _retire(self, mace_entry *e, int counter) noexcept nogil:
        # Count an entry that leaves without a report: against its container once known.
        # A packet a socket's queue held was never read by the container: unpaired.
        cdef int g
        if counter == CC_EXPIRED and (self._awaits_socket(e) or self._queued(e)):
            # received by a container's socket and never read; or nothing ended its chain
            # (its CPU went idle), so no socket took it
            counter = CC_UNPAIRED
        if e.container >= 0:
            self.ccount[(e.container * 2 + e.dir) * NCC + counter] += 1
            return
        if counter == CC_EXPIRED:
            g = G_STALE
        elif counter == CC_EVICTED:
            g = G_EVICTED
        else:
            g = G_SUPERSEDED
        self.gcount[g] += 1

    cdef inline bint _queued(self, const mace_entry *e) noexcept nogil:
        # The socket segment: a container's packet in its socket's queue
        return (self.socket and e.container >= 0 and e.dir == INGRESS
                and self.steps[INGRESS][e.step].type == T_READY)

    cdef inline bint _awaits_socket(self, const mace_entry *e) noexcept nogil:
        # The socket segment: a container's packet its device received, whose socket's
        # data_ready comes next in the same chain if a datagram socket takes it
        return (self.socket and e.container >= 0 and e.dir == INGRESS
                and self.steps[INGRESS][e.step].type == T_RECV and self.steps[INGRESS][e.step].cls == C_INNER)

    cdef inline bint _expired(self, const mace_entry *e) noexcept nogil:
        # One rule wherever an entry is touched (an event, a free, a sweep, a full window):
        # once the clock - the newest event seen - is past t0 + max_age, it expired.
        return self.now > e.t0 + self.max_age

    cdef void _sweep(self, uint64_t n) noexcept nogil:
        # Expire old entries a few slots at a time, so counts stay current and the table
        # does not silt up with packets that never completed.
        cdef uint64_t mask = self.cap - 1, i = self.sweep_at, k = 0
        while k < n:
            if self.table[i].skb and self._expired(&self.table[i]):
                self._retire(&self.table[i], CC_EXPIRED)
                self._delete(i)        # slot i may now hold a shifted entry: look again
            else:
                i = (i + 1) & mask
                k += 1
        self.sweep_at = i

    # -- paths ------------------------------------------------------------------------------

    cdef bint _sync_wait(self, const mace_entry *e) noexcept nogil:
        # Could the entry's next step be a synchronous one?
        cdef int j
        cdef const step_t *st
        for j in range(e.step + 1, self.nsteps[e.dir]):
            st = &self.steps[e.dir][j]
            if st.traced and st.sync and st.type != T_ROUTE and (st.prev >> e.step) & 1:
                return True
        return False

    cdef int _match(self, mace_entry *e, const mace_event *ev, uint8_t t, uint8_t cls) noexcept nogil:
        cdef int j, x
        cdef const step_t *st
        cdef uint32_t l3
        # A synchronous step runs in the call chain of the previous one: same CPU, thread and
        # interrupt context (softirq work runs on top of whatever task it interrupted), soon.
        cdef bint adjacent = (self.adjacent and e.cpu == ev.cpu and e.tid == ev.tid
                              and e.ctx == (ev.flags & CTX_BITS)
                              and ev.ts - (e.t0 + e.tlast) <= SYNC_MAX)
        l3 = ev.len - ETH_HLEN if (t == T_XMIT or t == T_QUEUE) else ev.len
        if l3 != e.l3 or ev.ts < e.t0 + e.tlast:
            return -1
        for j in range(e.step + 1, self.nsteps[e.dir]):
            st = &self.steps[e.dir][j]
            if not st.traced or not (st.prev >> e.step) & 1:
                continue
            if st.type != t or not (st.cls & cls):
                continue
            if st.sync and not adjacent:
                # A packet in a neighbour queue leaves it in the chain that received the
                # answer, the one that asked as well: a later packet given its address
                # elsewhere (the host's own, sent into the container) is not it.
                # (An answer from a container's veth flushes only that container's queue.)
                x = self.dev_container[ev.dev] if st.cls == C_VETH else -1
                if e.flags & F_PARKED:
                    if not self._flushed(e, ev, x):
                        continue
                elif not (self._may_queue(e) and self._flushed(e, ev, x)):
                    continue
            if e.container >= 0:
                if st.cls == C_VETH and self.dev_container[ev.dev] != e.container:
                    continue
                if st.cls == C_INNER and ev.dev != self.inner_of[e.container]:
                    continue
            elif st.attr and e.dir == EGRESS:
                x = self.dev_container[ev.dev]
                if x < 0 or self.inner_of[x] != e.start_dev:
                    continue
            if st.sync and not adjacent and not e.flags & F_PARKED:
                # its chain ended in the neighbour queue, and its CPU did nothing else since
                e.flags |= F_PARKED | F_QUEUED
                self.gcount[G_PARKED] += 1
            return j
        return -1

    cdef int _advance(self, mace_entry *e, const mace_event *ev, int j) noexcept nogil:
        # Returns 1 when the entry is done (reported or dropped) and must be deleted.
        cdef const step_t *st = &self.steps[e.dir][j]
        cdef uint64_t delta = ev.ts - e.t0
        cdef int x
        if st.attr and e.container < 0:
            if e.dir == INGRESS:
                e.proto = ev.proto
            if not _is_ip(e.proto):
                self.gcount[G_NONIP] += 1     # ARP and friends: not what mace measures
                return 1
            x = self.dev_container[ev.dev]
            e.container = x
            self.ccount[(x * 2 + e.dir) * NCC + CC_CROSSED] += 1
        MACE_ASSERT(0 <= j < self.nsteps[e.dir] and st.hop < MACE_HOPS, "step and hop within the path")
        if st.hop >= 0:
            e.hop[st.hop] = <uint32_t>delta
        e.step = j
        e.tlast = <uint32_t>delta
        e.cpu = ev.cpu
        e.tid = ev.tid
        e.ctx = ev.flags & CTX_BITS
        if e.flags & F_PARKED:
            # the neighbour answered: the queue is flushed in this chain, packet by packet
            self.nq_open[e.dir] = False
            self._mark(&self.fl[e.dir], ev, e.container if e.dir == INGRESS else -1)
            self.fl[e.dir].skb = 0          # (a packet's step, not an answer's)
            e.flags &= ~(F_PARKED | F_QUEUED)
        if st.end:
            self._emit(e, ev)
            return 1
        self._pending(e, ev, self.front)
        return 0

    cdef void _pending(self, const mace_entry *e, const mace_event *ev, bint front) noexcept nogil:
        if ev.cpu < self.ncpu and self._sync_wait(e):
            self._pq_push(ev.cpu, ev.skb, ev.ts, front)

    cdef void _route(self, const mace_event *ev, uint8_t cls) noexcept nogil:
        # A routing decision (fib_table_lookup) carries no skb: it is timed for the one call
        # chain its CPU is in, if that is unambiguous.  The chain is the CPU's only pending
        # entry, from the same thread and interrupt context, waiting for a synchronous step
        # of a path whose route step takes this device's class (the lookup's result: the
        # uplink on egress, the bridge or a veth on ingress).  A batch of receives (see
        # _note), known to the table or not, gets none.  The first such lookup of a packet
        # counts (later ones: policy rules, source validation).  The entry's step and chain
        # are left as they were: the decision is a hop, never a link of the chain.
        cdef int cpu = ev.cpu, j
        cdef int64_t s
        cdef mace_entry *e
        cdef const step_t *st
        if cpu < self.ncpu:
            self.notes[cpu].routed = 1
        if cpu < self.ncpu and self.pq_n[cpu] == 1 and not self.notes[cpu].batch:
            s = self._lookup(self.pq_skb[cpu * PQ])
            if s >= 0:
                e = &self.table[s]
                if (e.cpu == cpu and e.tid == ev.tid and e.ctx == (ev.flags & CTX_BITS)
                        and not e.flags & F_PARKED and ev.ts >= e.t0 + e.tlast
                        and ev.ts - (e.t0 + e.tlast) <= SYNC_MAX):
                    for j in range(e.step + 1, self.nsteps[e.dir]):
                        st = &self.steps[e.dir][j]
                        if (st.type == T_ROUTE and st.traced and (st.prev >> e.step) & 1
                                and st.cls & cls):
                            MACE_ASSERT(0 <= st.hop < MACE_HOPS, "route hop within the report")
                            if e.hop[st.hop] == 0:
                                e.hop[st.hop] = <uint32_t>max(ev.ts - e.t0, 1)
                            return
        self.gcount[G_ROUTE_UNCLAIMED] += 1

    cdef void _note(self, const mace_event *ev, uint8_t t, uint8_t cls) noexcept nogil:
        # Two events of one kind and device class in a row on a CPU, of two packets, in one
        # thread and context, with no routing decision between them, are a batch (a NIC's GRO
        # list: all receive, then each is routed, some not at all (early demux), then each
        # is forwarded).  Whose decision is whose is then not known, whatever the table
        # holds: none is timed until the CPU's pending chains are over (_route).
        cdef cpu_note_t *k
        if ev.cpu >= self.ncpu:
            return
        k = &self.notes[ev.cpu]
        if (k.skb and k.skb != ev.skb and k.type == t and k.cls == cls and k.tid == ev.tid
                and k.ctx == (ev.flags & CTX_BITS) and not k.routed):
            k.batch = 1
        k.skb = ev.skb
        k.tid = ev.tid
        k.type = t
        k.cls = cls
        k.ctx = ev.flags & CTX_BITS
        k.routed = 0

    # -- the socket segment -------------------------------------------------------------------

    cdef void _call(self, const mace_event *ev, bint enter) noexcept nogil:
        # A thread of a traced container enters or leaves a send call (the events are the
        # containers' own: their perf events are bound to the containers' cgroups).  Its
        # packets that reach the veth in between, in its own context, start there.
        cdef send_call_t *c = &self.calls[ev.tid & self.calls_mask]
        if enter:
            c.ts = ev.ts
            c.tid = ev.tid
        elif c.tid == ev.tid:
            c.ts = 0

    cdef sock_queue_t *_sock(self, uint64_t sk, bint make) noexcept nogil:
        # The queue of socket `sk` (open addressing, slots never emptied: a socket's slot
        # stays for its next packets).  With `make`, a full probe window gives a slot no
        # event touched for max_age (whatever was queued there expired); NULL if there is
        # none: the caller counts what it could not queue.
        cdef uint32_t i = <uint32_t>(((sk >> 6) * 0x9E3779B97F4A7C15ULL) >> 32) & self.socks_mask
        cdef uint32_t k, victim = i
        cdef sock_queue_t *q
        for k in range(SOCK_PROBES):
            q = &self.socks[(i + k) & self.socks_mask]
            if q.sk == sk:
                return q
            if q.sk == 0:
                if not make:
                    return NULL
                return self._sock_take(q, sk)
            if q.last < self.socks[victim].last:
                victim = (i + k) & self.socks_mask
        if not make or self.now <= self.socks[victim].last + self.max_age:
            return NULL
        return self._sock_take(&self.socks[victim], sk)

    cdef sock_queue_t *_sock_take(self, sock_queue_t *q, uint64_t sk) noexcept nogil:
        self.sock_gen += 1
        q.sk = sk
        q.gen = self.sock_gen
        q.head = q.tail = 0
        q.last = self.now
        return q

    cdef int64_t _rekey(self, uint64_t slot, uint64_t key) noexcept nogil:
        # The entry at `slot` under a new key (absent from the table); returns its new slot
        cdef mace_entry copy = self.table[slot]
        cdef mace_entry *e
        self._delete(slot)
        e = self._insert(key)
        copy.skb = key
        e[0] = copy
        return self._lookup(key)

    cdef void _ready(self, const mace_event *ev) noexcept nogil:
        # sk_data_ready: in the call chain that received a packet on the container's device,
        # the packet joins the queue of socket ev.skb.  Whose packet it is: the CPU's one
        # pending chain (same thread and context, within the chain, not a batch: see
        # _route), an ingress packet of a container waiting for this step.  Its skb is
        # consumed (or cloned, ICMP) once delivered, so from here it is keyed by its place in
        # the socket's queue.  A stream (TCP) is not paired: its receives take bytes.
        cdef int cpu = ev.cpu, j
        cdef int64_t s
        cdef mace_entry *e
        cdef sock_queue_t *q
        if not self.socket:
            self.gcount[G_SOCK_UNCLAIMED] += 1
            return
        if cpu >= self.ncpu or self.pq_n[cpu] != 1 or self.notes[cpu].batch:
            self._unclaimed(ev)
            return
        s = self._lookup(self.pq_skb[cpu * PQ])
        if s < 0:
            self._unclaimed(ev)
            return
        e = &self.table[s]
        if self._expired(e):
            self._retire(e, CC_EXPIRED)
            self._delete(<uint64_t>s)
            self._unclaimed(ev)
            return
        if (e.dir != INGRESS or e.container < 0 or e.cpu != cpu or e.tid != ev.tid
                or e.ctx != (ev.flags & CTX_BITS) or e.flags & F_PARKED
                or ev.ts < e.t0 + e.tlast or ev.ts - (e.t0 + e.tlast) > SYNC_MAX):
            self._unclaimed(ev)
            return
        for j in range(e.step + 1, self.nsteps[INGRESS]):
            if self.steps[INGRESS][j].type == T_READY and (self.steps[INGRESS][j].prev >> e.step) & 1:
                break
        else:
            self._unclaimed(ev)
            return
        self._pq_drop(cpu, 1)
        q = self._sock(ev.skb, True) if ev.proto != IPPROTO_TCP else NULL
        if q == NULL:
            # a stream's (not paired), or no slot for its socket: a miss of ours
            self.ccount[(e.container * 2 + INGRESS) * NCC
                        + (CC_UNPAIRED if ev.proto == IPPROTO_TCP else CC_EVICTED)] += 1
            self._delete(<uint64_t>s)
            return
        e.step = j
        e.tlast = <uint32_t>(ev.ts - e.t0)
        e.cpu = ev.cpu
        e.ctx = ev.flags & CTX_BITS
        if e.proto == ETH_P_IPV6:       # (its ethertype, from its veth's xmit)
            e.flags |= F_IPV6
        e.proto = ev.proto
        e.tid = q.tail          # its place in the queue: checked when a receive takes it
        self._rekey(<uint64_t>s, _queued_key(ev.skb, q.gen, q.tail))
        q.tail += 1
        q.last = ev.ts

    cdef void _unclaimed(self, const mace_event *ev) noexcept nogil:
        # A packet joined socket ev.skb's queue that we cannot tell (a batch, a packet from
        # the host, one whose entry expired).  If the socket is a container's, a receive
        # takes it all the same: its place is kept, empty, or every later packet there would
        # be paired with the receive of the one before.  Whose socket it is we cannot know
        # here, so every datagram socket's place is kept (the host's are never read: their
        # slots only age out, see _sock).
        cdef sock_queue_t *q
        self.gcount[G_SOCK_UNCLAIMED] += 1
        if ev.proto == IPPROTO_TCP:
            return
        q = self._sock(ev.skb, True)
        if q != NULL:
            q.tail += 1
            q.last = ev.ts

    cdef void _received(self, const mace_event *ev) noexcept nogil:
        # sock_recv_length: a receive call of a container's thread returned ev.len bytes of
        # socket ev.skb (ev.proto: its flags).  A datagram socket hands out one packet per
        # call, the oldest: the head of the socket's queue, which it ends if the length is
        # that packet's payload (its whole IP packet for a raw socket).
        cdef int32_t ret = <int32_t>ev.len
        cdef sock_queue_t *q
        cdef uint32_t seq
        cdef int64_t s
        cdef mace_entry *e
        if not self.socket or ret < 0 or ev.proto & (MSG_PEEK | MSG_ERRQUEUE):
            return
        q = self._sock(ev.skb, False)
        if q == NULL or q.head == q.tail:
            self.gcount[G_RECV_UNPAIRED] += 1
            return
        seq = q.head
        q.head += 1
        q.last = ev.ts
        s = self._lookup(_queued_key(ev.skb, q.gen, seq))
        if s < 0 or self.table[s].tid != seq:
            self.gcount[G_RECV_UNPAIRED] += 1        # expired, evicted: counted there
            return
        e = &self.table[s]
        if self._expired(e):
            self._retire(e, CC_EXPIRED)             # (as unpaired: see _retire)
            self._delete(<uint64_t>s)
            self.gcount[G_RECV_UNPAIRED] += 1
            return
        MACE_ASSERT(self.steps[INGRESS][e.step].type == T_READY, "a queued packet's step")
        if ev.ts >= e.t0 + e.tlast and _payload_fits(<uint32_t>ret, e.l3, e.proto, e.flags & F_IPV6):
            self._emit(e, ev)
        else:
            self.ccount[(e.container * 2 + INGRESS) * NCC + CC_UNPAIRED] += 1
        self._delete(<uint64_t>s)

    cdef void _emit(self, mace_entry *e, const mace_event *ev) noexcept nogil:
        cdef int cd = e.container * 2 + e.dir
        cdef uint64_t lat = ev.ts - e.t0
        cdef mace_report *r
        self.ccount[cd * NCC + CC_REPORTS] += 1
        self.seq[cd] += 1
        self.hist[cd * NB + _bucket(lat)] += 1
        self.lat_sum[cd] += lat
        if lat < self.lat_min[cd]:
            self.lat_min[cd] = lat
        if lat > self.lat_max[cd]:
            self.lat_max[cd] = lat
        if self.pm != NULL:
            self._pm_count(e, lat, cd)
        MACE_ASSERT(0 <= cd < self.ncont * 2, "report for a known container")
        MACE_ASSERT(self.nreports < self.report_cap, "report buffer has room")
        if self.nreports == self.report_cap:
            return                    # cannot happen: consume() stops while one slot is free
        r = &self.reports[self.nreports]
        self.nreports += 1
        memset(r, 0, sizeof(mace_report))       # padding too: reports compare byte for byte
        r.t0 = e.t0
        r.latency = <uint32_t>lat
        r.len = e.l3
        r.seq = self.seq[cd]
        r.container = <uint16_t>e.container
        r.dir = e.dir
        r.nhops = self.nhops[e.dir]       # HOP_SLOTS, and the socket segment's last one
        r.cpu = ev.cpu
        memcpy(r.hop, e.hop, sizeof(r.hop))

    cdef void _pm_count(self, const mace_entry *e, uint64_t lat, int cd) noexcept nogil:
        # Row 0 the latency; with hops, row 1 + i the interval ending at hop slot i (from
        # the previous step seen), row PMR - 1 the last one, to the end (as the summary's).
        cdef int i, nb = self.pm_nb + 1
        cdef uint64_t prev = 0, v
        cdef uint64_t *row = &self.pm[cd * PMR * nb]
        cdef uint64_t *sums = &self.pm_sum[cd * PMR]
        row[_pm_bucket(self.pm_bounds, self.pm_nb, lat)] += 1
        sums[0] += lat
        if not self.pm_hops:
            return
        for i in range(MACE_HOPS + 1):
            if i < MACE_HOPS:
                if e.hop[i] == 0:
                    continue
                v = e.hop[i]
            else:
                v = lat
            v = v - prev if v > prev else 0
            row[(1 + i) * nb + _pm_bucket(self.pm_bounds, self.pm_nb, v)] += 1
            sums[1 + i] += v
            if i < MACE_HOPS:
                prev = e.hop[i]

    cdef void _resolve(self, int cpu, uint64_t skb, uint64_t ts, const mace_event *ev,
                       uint8_t t, uint8_t cls, bint asks) noexcept nogil:
        # The CPU moved on (to ev) while this packet awaited a synchronous step: its call
        # chain ended without reaching the next device.
        cdef int64_t s = self._lookup(skb)
        cdef mace_entry *e
        if s < 0:
            return
        e = &self.table[s]
        if e.cpu != cpu or e.t0 + e.tlast != ts or not self._sync_wait(e):
            return
        if self._expired(e):
            self._retire(e, CC_EXPIRED)
            self._delete(<uint64_t>s)
            return
        # (`asks`: ev may be a request of e's chain.  It is not when it is another pending
        # packet's next step, and it is the newest chain's when several packets were
        # pending: the earlier ones' chains ended before it began.)
        if (ev.tid == e.tid and (ev.flags & CTX_BITS) == e.ctx and asks
                and self._neighbour_wait(e, ev, t, cls)):
            # The chain went on to send an ARP request (or an IPv6 neighbour solicitation)
            # on the next device: the packet waits in the neighbour queue, and leaves it by
            # that device or by a traced drop.
            e.flags |= F_PARKED
            self.gcount[G_PARKED] += 1
            self.ask_at[e.dir] = e.t0 + e.tlast
            if not self.nq_open[e.dir]:
                self.nq_open[e.dir] = True
                self.nq_since[e.dir] = e.t0 + e.tlast
            return
        if self._may_queue(e):
            # While a resolution is in progress, a chain that ends where the neighbour would
            # be asked ended in the same queue: the kernel asks only once.
            e.flags |= F_PARKED | F_QUEUED
            self.gcount[G_PARKED] += 1
            return
        if self._awaits_socket(e):
            # received by the container, but no socket took it in its chain (a port nobody
            # listens on, a stream's: see Plan.socket_probes)
            self.ccount[(e.container * 2 + INGRESS) * NCC + CC_UNPAIRED] += 1
        elif e.container >= 0:
            # egress: delivered to the host itself (or dropped untraced) before the uplink;
            # ingress (with hops): the veth did not hand it to the container
            self.ccount[(e.container * 2 + e.dir) * NCC + (CC_LOCAL if e.dir == EGRESS else CC_REJECTED)] += 1
        elif e.dir == EGRESS:
            self.gcount[G_FOREIGN] += 1       # an eth0 that is not a monitored container's
        else:
            self.gcount[G_UNCLAIMED] += 1     # received for the host or an unmonitored container
        self._delete(<uint64_t>s)

    cdef void _pq_drop(self, int cpu, int k) noexcept nogil:
        # forget the k oldest pending skbs of a CPU
        cdef uint64_t *q = &self.pq_skb[cpu * PQ]
        cdef uint64_t *qt = &self.pq_ts[cpu * PQ]
        cdef int n = self.pq_n[cpu] - k
        MACE_ASSERT(0 <= cpu < self.ncpu and 0 <= k, "pending queue drop within its bounds")
        if n > 0:
            memmove(q, q + k, n * sizeof(uint64_t))
            memmove(qt, qt + k, n * sizeof(uint64_t))
        self.pq_n[cpu] = n if n > 0 else 0
        if n <= 0:
            self.notes[cpu].batch = 0

    cdef void _pq_push(self, int cpu, uint64_t skb, uint64_t ts, bint front) noexcept nogil:
        cdef uint64_t *q = &self.pq_skb[cpu * PQ]
        cdef uint64_t *qt = &self.pq_ts[cpu * PQ]
        cdef int n = self.pq_n[cpu]
        MACE_ASSERT(0 <= cpu < self.ncpu and 0 <= n <= PQ, "pending queue within its bounds")
        if n == PQ:
            self.gcount[G_PQ_OVERFLOW] += 1   # no wider batch exists; forget the oldest
            self._pq_drop(cpu, 1)
            n -= 1
        if front:
            memmove(q + 1, q, n * sizeof(uint64_t))
            memmove(qt + 1, qt, n * sizeof(uint64_t))
            q[0] = skb
            qt[0] = ts
        else:
            q[n] = skb
            qt[n] = ts
        self.pq_n[cpu] = n + 1

    cdef bint _sibling(self, int cpu, const mace_event *ev, uint8_t t, uint8_t cls) noexcept nogil:
        # Is ev the next packet of the same batch as the newest pending one (a NIC's GRO
        # list, a NAPI veth)?  Then all of the batch's receives come before any of them is
        # forwarded, and they do not end each other's call chains.
        cdef int n = self.pq_n[cpu]
        MACE_ASSERT(0 < n <= PQ, "a sibling has a pending chain to follow")
        cdef int64_t s = self._lookup(self.pq_skb[cpu * PQ + n - 1])
        cdef const mace_entry *e
        cdef const step_t *st
        if s < 0:
            return False
        e = &self.table[s]
        st = &self.steps[e.dir][e.step]
        return (st.type == t and (st.cls & cls) != 0 and e.tid == ev.tid
                and e.ctx == (ev.flags & CTX_BITS))

    cdef void _pq_settle(self, const mace_event *ev, uint8_t t, uint8_t cls) noexcept nogil:
        # Before ev is handled: if it continues a pending chain, the chains queued before it
        # ended; if it starts something else (not a sibling of the batch), all of them did.
        cdef int cpu = ev.cpu, n, i, pos = -1
        cdef uint64_t *q
        self.adjacent = False
        self.front = False
        if cpu >= self.ncpu:
            return
        n = self.pq_n[cpu]
        q = &self.pq_skb[cpu * PQ]
        for i in range(n):
            if q[i] == ev.skb:
                pos = i
                break
        if pos >= 0:
            for i in range(pos):
                self._resolve(cpu, self.pq_skb[cpu * PQ + i], self.pq_ts[cpu * PQ + i], ev, t, cls, False)
            self._pq_drop(cpu, pos + 1)
            self.adjacent = True
            self.front = True
        elif n and not self._sibling(cpu, ev, t, cls):
            for i in range(n):
                self._resolve(cpu, self.pq_skb[cpu * PQ + i], self.pq_ts[cpu * PQ + i], ev, t, cls,
                              i == n - 1)
            self.pq_n[cpu] = 0
            self.notes[cpu].batch = 0

    cdef bint _neighbour_wait(self, const mace_entry *e, const mace_event *ev, uint8_t t, uint8_t cls) noexcept nogil:
        # (net_dev_queue carries no protocol: the length and the packet's family tell)
        if e.dir == EGRESS:
            return (e.container >= 0 and t == T_QUEUE and cls & C_UPLINK
                    and ev.len - ETH_HLEN == (ND_L3 if e.proto == ETH_P_IPV6 else ARP_L3))
        return t == T_XMIT and cls & (C_BRIDGE | C_VETH) and (
            (ev.proto == ETH_P_ARP and ev.len - ETH_HLEN == ARP_L3)
            or (ev.proto == ETH_P_IPV6 and ev.len - ETH_HLEN == ND_L3))

    cdef bint _may_queue(self, const mace_entry *e) noexcept nogil:
        # e's chain ended while a resolution was in progress in its direction (it began no
        # longer ago than a packet may wait), right before the step where the neighbour is
        # asked for.
        cdef uint64_t since = self.nq_since[e.dir]
        cdef uint64_t last = e.t0 + e.tlast
        cdef int j
        cdef const step_t *st
        if since == 0 or self.now > since + self.max_age or last + SYNC_MAX < since:
            return False
        if not self.nq_open[e.dir] and last > self.fl[e.dir].ts:
            return False
        if e.dir == EGRESS and e.container < 0:
            return False
        for j in range(e.step + 1, self.nsteps[e.dir]):
            st = &self.steps[e.dir][j]
            if not st.traced or not st.sync or not (st.prev >> e.step) & 1:
                continue
            if e.dir == EGRESS and st.type == T_QUEUE and st.cls & C_UPLINK:
                return True
            if e.dir == INGRESS and st.type == T_XMIT and st.cls & (C_BRIDGE | C_VETH):
                return True
        return False

    cdef void _answer(self, const mace_event *ev, uint8_t t, uint8_t cls) noexcept nogil:
        # A neighbour's answer received while a resolution is in progress (ARP, or an IPv6
        # advertisement; netif_receive_skb's record has no protocol, so by length): it ends
        # the resolution, and the queue is flushed in its call chain.
        cdef int d, k
        cdef uint32_t l3 = ev.len
        cdef answer_t *a
        if t != T_RECV and t != T_RX:
            return
        if l3 != ARP_L3 and l3 != ND_L3 and l3 != NA_L3 and not (l3 == ARP_PAD_L3 and cls & C_UPLINK):
            return
        if t == T_RX and ev.proto != ETH_P_ARP and ev.proto != ETH_P_IPV6:
            return                          # netif_rx tells the protocol: not a neighbour's
        for d in range(2):
            if not cls & (C_UPLINK if d == EGRESS else C_VETH):
                continue
            if self.ask_at[d] and ev.ts <= self.ask_at[d] + self.max_age:
                # Any receive of an answer's size may be the answer (a 72-byte TCP ACK, a
                # padded 46-byte frame are as well): every one is kept, so a false one
                # first does not hide the true one.  The answer's next steps move its own.
                a = NULL
                for k in range(ANSWERS):
                    if (self.ans[d][k].skb == ev.skb and ev.ts >= self.ans[d][k].ts
                            and ev.ts - self.ans[d][k].ts <= SYNC_MAX):
                        a = &self.ans[d][k]
                        break
                if a == NULL:
                    a = &self.ans[d][self.ans_next[d]]
                    self.ans_next[d] = (self.ans_next[d] + 1) % ANSWERS
                self._mark(a, ev, self.dev_container[ev.dev] if d == INGRESS else -1)
            # (and the answer's next steps, as its backlog is processed, perhaps in another
            # thread: the queue is flushed where it reaches the neighbour code, after them)
            if self.nq_open[d] or (ev.skb != 0 and ev.skb == self.fl[d].skb and ev.ts >= self.fl[d].ts
                                   and ev.ts - self.fl[d].ts <= SYNC_MAX):
                self.nq_open[d] = False
                self._mark(&self.fl[d], ev, self.dev_container[ev.dev] if d == INGRESS else -1)

    cdef void _mark(self, answer_t *a, const mace_event *ev, int cont) noexcept nogil:
        # a chain the neighbour queue may be flushed in: ev's, sending to `cont` (-1: any)
        a.skb = ev.skb
        a.ts = ev.ts
        a.cpu = ev.cpu
        a.tid = ev.tid
        a.ctx = ev.flags & CTX_BITS
        a.cont = cont

    cdef bint _flushed(self, const mace_entry *e, const mace_event *ev, int to) noexcept nogil:
        # Does ev continue the chain that flushes e's neighbour queue?  (`to`: the container
        # ev sends to, -1 if it does not say; an answer that names its container flushes
        # only packets to it)
        cdef int d = e.dir, k
        cdef const answer_t *a
        for k in range(ANSWERS + 1):
            a = &self.fl[d] if k == ANSWERS else &self.ans[d][k]
            if (a.ts != 0 and ev.cpu == a.cpu and ev.tid == a.tid and (ev.flags & CTX_BITS) == a.ctx
                    and ev.ts >= a.ts and ev.ts - a.ts <= FLUSH_MAX and a.ts > e.t0 + e.tlast
                    and (to < 0 or a.cont < 0 or a.cont == to)):
                return True
        return False

    cdef void _conflict(self, mace_entry *e, const mace_event *ev, uint8_t t, uint8_t cls) noexcept nogil:
        # The event concerns the entry's address but does not continue its path: the packet
        # is over (its address was reused), or it went somewhere mace does not measure.
        cdef int y
        if t == T_XMIT and cls & C_VETH and e.dir == EGRESS:
            MACE_ASSERT(0 <= ev.dev < self.ndevs and self.dev_container[ev.dev] >= 0, "a veth names its container")
            # from one container (monitored or not) to another through the bridge
            if e.container >= 0:
                self.ccount[(e.container * 2 + EGRESS) * NCC + CC_LOCAL] += 1
            y = self.dev_container[ev.dev]
            if _is_ip(ev.proto):
                self.ccount[(y * 2 + INGRESS) * NCC + CC_CROSSED] += 1
                self.ccount[(y * 2 + INGRESS) * NCC + CC_LOCAL] += 1
            e.flags |= F_ACCOUNTED
            return
        if self._awaits_socket(e):
            # received by the container and over before a socket took it, freed where no
            # drop is sampled (a port nobody listens on: see Plan.probes), as in _resolve
            self.ccount[(e.container * 2 + INGRESS) * NCC + CC_UNPAIRED] += 1
            return
        self._retire(e, CC_REJECTED)

    cdef void _fresh(self, const mace_event *ev, uint8_t t, uint8_t cls) noexcept nogil:
        # An event with no entry: a start, a crossing we missed the start of, or noise.
        cdef mace_entry *e
        cdef int x
        cdef uint64_t g, t0
        cdef send_call_t *c
        if t == T_XMIT and cls & C_INNER and not self.veth_start:
            e = self._insert(ev.skb)
            e.dir = EGRESS
            e.l3 = ev.len - ETH_HLEN
            e.proto = ev.proto
            e.start_dev = ev.dev
        elif t == T_RX and cls & C_VETH and self.veth_start:
            # Into the host from a container: the veth's name says which, from the start.
            if not _is_ip(ev.proto):
                self.gcount[G_NONIP] += 1     # ARP and friends: not what mace measures
                return
            x = self.dev_container[ev.dev]
            MACE_ASSERT(x >= 0, "a veth names its container")
            t0 = ev.ts
            if self.socket:
                # The container's own transmit hands it to the veth: in the sending thread,
                # not in an interrupt, while a send call of that thread is in progress
                c = &self.calls[ev.tid & self.calls_mask]
                if ((ev.flags & CTX_BITS) or c.ts == 0 or c.tid != ev.tid or c.ts > ev.ts
                        or ev.ts - c.ts > self.max_age):
                    self.ccount[(x * 2 + EGRESS) * NCC + CC_CROSSED] += 1
                    self.ccount[(x * 2 + EGRESS) * NCC + CC_UNPAIRED] += 1
                    return
                t0 = c.ts
            e = self._insert(ev.skb)
            e.dir = EGRESS
            e.l3 = ev.len
            e.proto = ev.proto
            e.start_dev = ev.dev
            e.container = x
            e.step = 1
            self.ccount[(x * 2 + EGRESS) * NCC + CC_CROSSED] += 1
            e.t0 = t0
            if t0 != ev.ts:
                e.hop[0] = <uint32_t>(ev.ts - t0)       # the container's own stack
                e.tlast = <uint32_t>(ev.ts - t0)
            e.cpu = ev.cpu
            e.tid = ev.tid
            e.ctx = ev.flags & CTX_BITS
            self._pending(e, ev, False)
            return
        elif t == T_RECV and cls & C_UPLINK:
            e = self._insert(ev.skb)
            e.dir = INGRESS
            e.l3 = ev.len
            e.start_dev = ev.dev
        else:
            if cls & C_VETH:
                x = self.dev_container[ev.dev]
                if t == self.steps[EGRESS][self.boundary[EGRESS]].type:
                    self.ccount[(x * 2 + EGRESS) * NCC + CC_CROSSED] += 1
                    self.ccount[(x * 2 + EGRESS) * NCC + CC_ORPHANS] += 1
                elif t == T_XMIT and _is_ip(ev.proto):
                    # Into a container with no uplink start: sent by the host itself, unless
                    # the table had to give up the packet's entry.
                    self.ccount[(x * 2 + INGRESS) * NCC + CC_CROSSED] += 1
                    g = self._home(ev.skb) & self.ghost_mask
                    if self.ghost[g] == ev.skb:
                        self.ghost[g] = 0
                        self.ccount[(x * 2 + INGRESS) * NCC + CC_ORPHANS] += 1
                    else:
                        self.ccount[(x * 2 + INGRESS) * NCC + CC_LOCAL] += 1
            return
        e.t0 = ev.ts
        e.container = -1
        e.cpu = ev.cpu
        e.tid = ev.tid
        e.ctx = ev.flags & CTX_BITS
        self._pending(e, ev, False)

    cdef int _event(self, const mace_event *ev) noexcept nogil:
        cdef uint8_t t = self.kind_type[ev.kind] if ev.kind < self.nkinds else T_NONE
        cdef uint8_t cls = self.dev_class[ev.dev] if 0 <= ev.dev < self.ndevs else 0
        cdef int64_t s
        cdef mace_entry *e
        cdef int j
        MACE_ASSERT(self.used <= self.cap, "table fill within its size")
        self.gcount[G_EVENTS] += 1
        if ev.ts > self.now:
            self.now = ev.ts
        if t == T_ROUTE:
            self._route(ev, cls)
            return 0
        if t == T_CALL or t == T_RETURN:
            self._call(ev, t == T_CALL)
            return 0
        if t == T_READY:
            self._ready(ev)
            return 0
        if t == T_RECEIVED:
            self._received(ev)
            return 0
        if ev.skb == 0:
            self.gcount[G_IGNORED] += 1     # (not a network event: no chain ends for it)
            return 0
        if t == T_FREE:
            # A traced drop: the packet will not go further.  (It does not break a call
            # chain: frees of other packets happen inside one.)
            self.gcount[G_FREES] += 1
            s = self._lookup(ev.skb)
            if s >= 0:
                self._retire(&self.table[s], CC_EXPIRED if self._expired(&self.table[s]) else CC_DROPPED)
                self._delete(<uint64_t>s)
            return 0
        if t == T_NONE or cls == 0:
            # nothing mace follows: conservatively, whatever was pending on this CPU ended
            self.gcount[G_IGNORED] += 1
            self._pq_settle(ev, t, cls)
            self._note(ev, t, cls)
            return 0
        self._pq_settle(ev, t, cls)
        self._note(ev, t, cls)
        if self.ask_at[0] or self.ask_at[1]:      # (no answer is awaited before a request)
            self._answer(ev, t, cls)
        s = self._lookup(ev.skb)
        if s >= 0 and self._expired(&self.table[s]):
            self._retire(&self.table[s], CC_EXPIRED)
            self._delete(<uint64_t>s)
            s = -1
        if s >= 0:
            e = &self.table[s]
            j = self._match(e, ev, t, cls)
            if j >= 0:
                if self._advance(e, ev, j):
                    self._delete(<uint64_t>s)
                return 0
            self._conflict(e, ev, t, cls)
            j = e.flags & F_ACCOUNTED
            self._delete(<uint64_t>s)
            if j:
                return 0
        self._fresh(ev, t, cls)
        return 0

    # -- EventSink --------------------------------------------------------------------------

    cdef size_t consume(self, const mace_event *ev, size_t n) noexcept nogil:
        # Stops early, rather than overflow, when the report buffer is full: one event makes
        # at most one report.  Rings.feed hands the rest over once Python took the reports.
        cdef size_t i = 0
        MACE_ASSERT(self.nreports <= self.report_cap, "report count within the buffer")
        while i < n and self.nreports < self.report_cap:
            self._event(&ev[i])
            i += 1
        self._sweep(64 + i // 4)
        return i

    # -- Python side ------------------------------------------------------------------------

    def feed_bytes(self, const unsigned char[::1] data):
        """Consume packed events (mace.capture._ring.RECORD_FORMAT each), for tests and benchmarks;
        reports that do not fit the buffer wait in Python until take_reports()."""
        cdef size_t n = data.shape[0] // sizeof(mace_event)
        if n == 0:
            return 0
        cdef const mace_event *ev = <const mace_event *>&data[0]
        cdef size_t done = 0, k
        while done < n:
            with nogil:
                k = self.consume(ev + done, n - done)
            done += k
            if done < n:
                self.spill += self._take()
        return n

    cdef bytes _take(self):
        out = (<char *>self.reports)[:self.nreports * sizeof(mace_report)]
        self.nreports = 0
        return out

    def take_reports(self):
        """The reports since the last call, as packed bytes (REPORT_FORMAT each)."""
        out = bytes(self.spill) + self._take()
        self.spill = bytearray()
        return out

    def _set_seq(self, int container, int direction, uint64_t seq):
        """Set the last sequence number of a container and direction (tests: a wrap)."""
        if not 0 <= container < self.ncont or direction not in (0, 1):
            raise IndexError("no such container or direction")
        self.seq[container * 2 + direction] = seq

    @property
    def pending_reports(self):
        return self.nreports

    def counters(self):
        """Global counters and, per container and direction, the packet counters."""
        cdef int c, d, k
        glob = {name: self.gcount[k] for k, name in enumerate(GLOBAL_COUNTERS)}
        glob["table_used"] = self.used
        glob["table_size"] = self.cap
        glob["table_bytes"] = self.cap * sizeof(mace_entry)
        per = []
        for c in range(self.ncont):
            entry = {}
            for d in range(2):
                cd = c * 2 + d
                counts = {name: self.ccount[cd * NCC + k] for k, name in enumerate(CONTAINER_COUNTERS)}
                counts["min_ns"] = self.lat_min[cd] if self.lat_min[cd] != UINT64_MAX else None
                counts["max_ns"] = self.lat_max[cd] if counts["reports"] else None
                counts["sum_ns"] = self.lat_sum[cd]
                entry[DIRECTIONS[d]] = counts
            per.append(entry)
        return {"global": glob, "containers": per}

    def enable_buckets(self, bounds_ns, bint hops=False):
        """Count every report from now on in buckets with these inclusive upper bounds (ns,
        ascending, at most 32; a last bucket takes the rest), and with `hops` each hop
        interval too: exact cumulative histograms, as Prometheus defines them, that a scrape
        reads with buckets().  Once only."""
        cdef int i, n = len(bounds_ns)
        if self.pm != NULL:
            raise RuntimeError("buckets are enabled already")
        if not 0 < n <= 32 or any(b <= a for a, b in zip(bounds_ns, bounds_ns[1:])) or bounds_ns[0] < 0:
            raise ValueError("bounds must be 1 to 32 ascending non-negative ns")
        self.pm = <uint64_t *>calloc(max(self.ncont * 2 * PMR * (n + 1), 1), sizeof(uint64_t))
        self.pm_sum = <uint64_t *>calloc(max(self.ncont * 2 * PMR, 1), sizeof(uint64_t))
        if self.pm == NULL or self.pm_sum == NULL:
            free(self.pm)
            free(self.pm_sum)
            self.pm = self.pm_sum = NULL
            raise MemoryError()
        for i in range(n):
            self.pm_bounds[i] = bounds_ns[i]
        self.pm_nb = n
        self.pm_hops = hops

    def buckets(self, int container, int direction):
        """(counts, sums) since enable_buckets(): counts[row][bucket] (not cumulative) and
        sums[row] in ns; row 0 is the latency, rows 1..HOPS the intervals ending at each hop
        slot and row HOPS + 1 the one ending at the end (all zero without hops)."""
        cdef int r, b, nb = self.pm_nb + 1
        if self.pm == NULL:
            raise RuntimeError("buckets are not enabled")
        if not 0 <= container < self.ncont or direction not in (0, 1):
            raise IndexError("no such container or direction")
        cdef int cd = container * 2 + direction
        cdef uint64_t *row = &self.pm[cd * PMR * nb]
        counts = [[row[r * nb + b] for b in range(nb)] for r in range(PMR)]
        sums = [self.pm_sum[cd * PMR + r] for r in range(PMR)]
        return counts, sums

    def histogram(self, int container, int direction):
        """Report counts per latency bucket (see bucket_bounds)."""
        if not 0 <= container < self.ncont or direction not in (0, 1):
            raise IndexError("no such container or direction")
        cdef uint64_t *h = &self.hist[(container * 2 + direction) * NB]
        return [h[i] for i in range(NB)]

    def in_flight(self):
        """Entries attributed to each container still in the table: (egress, ingress) each."""
        cdef uint64_t i
        out = [[0, 0] for _ in range(self.ncont)]
        for i in range(self.cap):
            if self.table[i].skb and self.table[i].container >= 0:
                out[self.table[i].container][self.table[i].dir] += 1
        return out

    def finish(self):
        """End of trace: count entries past their age as expired; returns in_flight()."""
        with nogil:
            self._sweep(self.cap)
        return self.in_flight()

    @property
    def now(self):
        return self.now
