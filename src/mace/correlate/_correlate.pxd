from libc.stdint cimport int16_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from mace.includes.abi cimport mace_event
from mace.includes.corr cimport MACE_HOPS, mace_entry, mace_report
from mace.capture._ring cimport EventSink


# One step of a direction's path: which event on which kind of device, and how it may
# follow the previous steps.
cdef struct step_t:
    uint8_t type        # T_XMIT, T_RECV, T_RX, T_QUEUE, T_ROUTE
    uint8_t cls         # device class bit: C_INNER, C_VETH, C_BRIDGE, C_UPLINK
    uint16_t prev       # bitmask of the steps this one may directly follow
    bint sync           # must run in the same call chain as the previous step
    bint traced         # its tracepoint/device is opened in this plan
    bint attr           # the step that names the container (its veth)
    bint end            # the step that completes the report
    int hop             # slot in the report's hop array, -1 for none


# What a CPU did last, to tell a batch of receives (a NIC's GRO list) from one packet's call
# chain: see Correlator._note.
cdef struct cpu_note_t:
    uint64_t skb        # the packet of its last packet event (0: none yet)
    uint32_t tid
    uint8_t type
    uint8_t cls
    uint8_t ctx
    uint8_t routed      # a routing decision came after that event
    uint8_t batch       # its pending chains are a batch: their decisions are not timed


# A call chain a neighbour queue may be flushed in: a waiting packet leaves the queue there.
# That of a receive that may be the neighbour's answer (by its size; see Correlator._answer),
# or of the step a waiting packet last left it in (skb 0).
cdef enum:
    ANSWERS = 8         # kept per direction, the oldest replaced

cdef struct answer_t:
    uint64_t skb        # the answer's packet (its later steps move the chain), or 0
    uint64_t ts         # 0: none
    uint32_t tid
    uint16_t cpu
    int16_t cont        # the container its packets go to (ingress), -1: any
    uint8_t ctx


# The socket segment: a thread inside a send call (its start), and a socket's queue of
# packets delivered to it, in order (where the receive calls end them).
cdef struct send_call_t:
    uint64_t ts         # when the call began (0: none)
    uint32_t tid


cdef struct sock_queue_t:
    uint64_t sk         # the socket (0: a free slot)
    uint64_t last       # newest event that touched it
    uint32_t head       # sequence number of its oldest queued packet
    uint32_t tail       # ... of the next one
    uint32_t gen        # which of the slot's sockets: a queued packet's key has it


cdef class Correlator(EventSink):
    cdef mace_entry *table          # open-addressed, `cap` slots
    cdef uint64_t cap
    cdef uint32_t bits
    cdef uint32_t probe_limit
    cdef uint64_t used              # occupied slots
    cdef uint64_t sweep_at          # next slot the incremental expiry sweep looks at
    cdef step_t steps[2][10]
    cdef int nsteps[2]
    cdef int boundary[2]            # the step whose event counts a crossing
    cdef bint veth_start            # egress starts at netif_rx_entry on the host-side veth
    cdef bint socket                # the socket segment: from a send call, to a receive call
    cdef uint8_t nhops[2]           # hop slots each direction's reports carry
    cdef send_call_t *calls         # direct-mapped by thread: its send call in progress
    cdef uint32_t calls_mask        # CALLS - 1
    cdef sock_queue_t *socks        # open-addressed by socket: its queue of packets
    cdef uint32_t socks_mask        # its slots - 1 (a power of two)
    cdef uint32_t sock_gen          # sockets given a slot so far (each its own keys)
    cdef uint8_t *kind_type         # kind -> T_*
    cdef int nkinds
    cdef uint8_t *dev_class         # device slot -> class bits
    cdef int16_t *dev_container     # device slot -> container (its veth), -1
    cdef int ndevs
    cdef int16_t *inner_of          # container -> slot of its inner device
    cdef int ncont
    cdef uint64_t *ccount           # container x direction x counter
    cdef uint64_t *gcount           # global counters
    cdef uint64_t *hist             # container x direction x bucket
    cdef uint64_t *lat_min
    cdef uint64_t *lat_max
    cdef uint64_t *lat_sum
    cdef uint64_t *seq              # container x direction: last sequence number
    # Exact counts in caller-given buckets (Prometheus' le bounds), when enabled: per
    # container x direction, PMR rows (the latency, then each hop interval) x (pm_nb + 1)
    cdef uint64_t *pm
    cdef uint64_t *pm_sum           # container x direction x row: sum in ns
    cdef uint64_t pm_bounds[32]     # inclusive upper bounds in ns, ascending
    cdef int pm_nb
    cdef bint pm_hops
    cdef uint64_t *pq_skb           # per CPU, oldest first: skbs whose synchronous step may
    cdef uint64_t *pq_ts            #   come next (a batch of receives), and when each moved
    cdef int *pq_n
    cdef cpu_note_t *notes          # per CPU: its last packet event (see _note)
    cdef bint adjacent              # the current event continues a pending call chain
    cdef bint front                 # ... and its entry goes back to the head of the queue
    cdef int ncpu
    cdef mace_report *reports
    cdef size_t nreports
    cdef size_t report_cap
    cdef uint64_t max_age
    cdef uint64_t now               # newest event time seen: the correlator's clock
    cdef bytearray spill            # reports feed_bytes() could not leave in the buffer
    cdef uint64_t *ghost            # skbs of unattributed ingress entries the table gave up
    cdef uint64_t ghost_mask
    # per direction: the latest neighbour resolution (when it began, whether it is still in
    # progress), and the call chain its answer ran in (the packets waiting for it, the one
    # that asked as well as those queued behind it, leave there, one by one); when a packet
    # last asked, and the receives since that may be the answer (see _answer)
    cdef uint64_t ask_at[2]
    cdef answer_t ans[2][ANSWERS]
    cdef int ans_next[2]
    cdef uint64_t nq_since[2]
    cdef bint nq_open[2]
    cdef answer_t fl[2]

    cdef int _plan(self, bint hops, bint bridge, bint end_at_queue, bint veth_start,
                   bint route, bint socket) except -1
    cdef int _configure(self, dev_classes, dev_containers, inner_slots) except -1
    cdef void _zero(self, int cd) noexcept
    cdef void _pm_count(self, const mace_entry *e, uint64_t lat, int cd) noexcept nogil
    cdef uint64_t _home(self, uint64_t skb) noexcept nogil
    cdef bytes _take(self)

    cdef int _event(self, const mace_event *ev) noexcept nogil
    cdef void _pending(self, const mace_entry *e, const mace_event *ev, bint front) noexcept nogil
    cdef int _advance(self, mace_entry *e, const mace_event *ev, int j) noexcept nogil
    cdef int _match(self, mace_entry *e, const mace_event *ev, uint8_t t, uint8_t cls) noexcept nogil
    cdef void _conflict(self, mace_entry *e, const mace_event *ev, uint8_t t, uint8_t cls) noexcept nogil
    cdef void _fresh(self, const mace_event *ev, uint8_t t, uint8_t cls) noexcept nogil
    cdef void _resolve(self, int cpu, uint64_t skb, uint64_t ts, const mace_event *ev, uint8_t t, uint8_t cls,
                       bint asks) noexcept nogil
    cdef void _pq_settle(self, const mace_event *ev, uint8_t t, uint8_t cls) noexcept nogil
    cdef void _pq_drop(self, int cpu, int k) noexcept nogil
    cdef void _pq_push(self, int cpu, uint64_t skb, uint64_t ts, bint front) noexcept nogil
    cdef bint _sibling(self, int cpu, const mace_event *ev, uint8_t t, uint8_t cls) noexcept nogil
    cdef bint _neighbour_wait(self, const mace_entry *e, const mace_event *ev, uint8_t t, uint8_t cls) noexcept nogil
    cdef bint _may_queue(self, const mace_entry *e) noexcept nogil
    cdef void _answer(self, const mace_event *ev, uint8_t t, uint8_t cls) noexcept nogil
    cdef bint _flushed(self, const mace_entry *e, const mace_event *ev, int to) noexcept nogil
    cdef void _mark(self, answer_t *a, const mace_event *ev, int cont) noexcept nogil
    cdef void _retire(self, mace_entry *e, int counter) noexcept nogil
    cdef bint _sync_wait(self, const mace_entry *e) noexcept nogil
    cdef int64_t _lookup(self, uint64_t skb) noexcept nogil
    cdef mace_entry *_insert(self, uint64_t skb) noexcept nogil
    cdef void _delete(self, uint64_t slot) noexcept nogil
    cdef bint _expired(self, const mace_entry *e) noexcept nogil
    cdef void _sweep(self, uint64_t n) noexcept nogil
    cdef void _route(self, const mace_event *ev, uint8_t cls) noexcept nogil
    cdef void _note(self, const mace_event *ev, uint8_t t, uint8_t cls) noexcept nogil
    cdef void _call(self, const mace_event *ev, bint enter) noexcept nogil
    cdef void _ready(self, const mace_event *ev) noexcept nogil
    cdef void _received(self, const mace_event *ev) noexcept nogil
    cdef sock_queue_t *_sock(self, uint64_t sk, bint make) noexcept nogil
    cdef sock_queue_t *_sock_take(self, sock_queue_t *q, uint64_t sk) noexcept nogil
    cdef bint _queued(self, const mace_entry *e) noexcept nogil
    cdef bint _awaits_socket(self, const mace_entry *e) noexcept nogil
    cdef void _unclaimed(self, const mace_event *ev) noexcept nogil
    cdef int64_t _rekey(self, uint64_t slot, uint64_t key) noexcept nogil
    cdef void _emit(self, mace_entry *e, const mace_event *ev) noexcept nogil
