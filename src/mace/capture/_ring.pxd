from libc.stdint cimport int16_t, int32_t, uint8_t, uint16_t, uint32_t, uint64_t

from mace.includes.abi cimport mace_event, perf_event_mmap_page


# Where the fields mace needs sit in one tracepoint's raw record (from its tracefs format file).
cdef struct kind_t:
    uint16_t tp_id      # common_type the kernel writes into every record of this tracepoint
    int32_t skb_off     # skbaddr (u64), or -1
    int32_t len_off     # len (u32), or -1
    int32_t name_off    # device name (__data_loc char[], or char[name_size] in place), or -1
    uint32_t name_size  # 0: name_off holds a __data_loc; else the size of the char array there
    int32_t proto_off   # protocol (u16), or -1
    uint32_t min_raw    # raw records shorter than this cannot hold the fields above


cdef struct ring_stats_t:
    uint64_t records    # every record read from the ring
    uint64_t samples    # samples decoded into events
    uint64_t lost       # samples the kernel dropped because the ring was full (PERF_RECORD_LOST)
    uint64_t throttled  # PERF_RECORD_THROTTLE and UNTHROTTLE records
    uint64_t unknown    # records of other types, samples of tracepoints not in the capture
    uint64_t errors     # malformed records and fields
    uint64_t late       # samples older than events already released (beyond the reorder delay)
    uint64_t forced     # releases forced early because the stage was full
    uint64_t cut        # events discarded by cut_at()/start_at(): the other capture delivered them
    uint64_t straddled  # hits whose two copies straddle a handover, delivered by the newer capture


cdef struct ring_t:
    int cpu
    int fd                      # the fd whose buffer this is (-1 for a synthetic image)
    perf_event_mmap_page *meta  # control page: data_head, data_tail
    unsigned char *data         # data area, `size` bytes, a power of two
    uint64_t size
    size_t map_len              # bytes mmapped, 0 when the memory is not ours to unmap
    mace_event *stage           # decoded, time-sorted, not yet released
    size_t nstage
    size_t cap                  # events `stage` holds (Rings.stage_cap)
    ring_stats_t st


cdef struct devkey_t:
    uint64_t a                  # the name, NUL-padded to 16 bytes, as two words
    uint64_t b
    int32_t slot                # -1 marks an empty bucket


cdef class EventSink:
    # Receives time-ordered events straight from the drain loop, without the GIL.
    cdef size_t consume(self, const mace_event *ev, size_t n) noexcept nogil


cdef class Rings:
    cdef ring_t *rings          # one per CPU
    cdef int nrings
    cdef list cpus              # CPU number of each ring, in ring order
    cdef kind_t kinds[256]
    cdef int nkinds
    cdef uint8_t *kind_of_tp    # common_type -> kind + 1 (0: not ours), 65536 entries
    cdef devkey_t *devs         # open-addressed device name table
    cdef uint32_t devmask
    cdef list devnames          # slot -> name (None: unused)
    cdef uint64_t since         # start_at(): events before this time are discarded (0: none)
    cdef uint64_t until         # cut_at(): events from this time on are discarded (0: none)
    cdef uint64_t log_from      # cut_at(): released events from this time on are logged as twins
    cdef mace_event *twins      # cut_at(): the log; start_at(): the older capture's log
    cdef size_t ntwins
    cdef size_t twins_cap
    cdef uint64_t twins_from    # start_at(): events from here to `since` are matched with twins
    cdef uint64_t inexact       # handovers whose twin log may be incomplete
    cdef uint8_t *twin_traced   # start_at(): per kind, the device slots the older capture traced
    cdef uint8_t *twin_all      # start_at(): per kind, 1 if the older capture traced every device
    cdef int twin_rows
    cdef int twin_cols
    cdef bint log_short         # cut_at(): the twin log ran out of room (inexact once)
    cdef bint draining          # a thread is inside drain()/feed(): one at a time
    cdef size_t stage_cap       # events each ring's stage holds
    cdef mace_event *out        # the batch handed to the consumer
    cdef size_t nout
    cdef size_t out_pos         # events of `out` a sink has taken
    cdef size_t *cut            # per-ring scratch for the merge
    cdef int *heap
    cdef size_t *pos
    cdef unsigned char *scratch # reassembles records that wrap around the data area
    cdef uint64_t released_ts   # newest timestamp released so far
    cdef uint64_t reorder_ns    # how long an event waits for earlier ones from other CPUs
    cdef uint64_t drained       # events released in all batches
    cdef bint more              # the last drain stopped early; call again
    cdef int *fds               # every perf fd, leaders included
    cdef uint8_t *fd_kind       # kind of each fd
    cdef uint8_t *fd_solo       # each fd: a group of its own (cgroup-bound), enabled apart
    cdef uint64_t ksamples[256] # samples decoded per kind
    cdef int nfds
    cdef int fds_cap
    cdef int *leader            # per ring: fd that owns the buffer, -1 before open
    cdef int ring_pages
    cdef uint32_t watermark
    cdef int epfd
    cdef int evfd               # eventfd that lets another thread interrupt wait()
    cdef Py_buffer *views       # per ring: the exported synthetic image, held until close
    cdef bint enabled
    cdef bint closed
    cdef bint closing           # close() was called while a thread was inside; last one out frees
    cdef int busy               # threads inside a section that released the GIL

    cdef int _track(self, int fd, int kind, bint solo) except -1
    cdef int _enter(self) except -1
    cdef void _leave(self) noexcept
    cdef int _enter_drain(self) except -1
    cdef void _leave_drain(self) noexcept
    cdef int _watch(self, int fd, int ring) except -1
    cdef int _map(self, int ring, unsigned char *mem, size_t map_len, int fd) except -1
    cdef int _group_ioctl(self, unsigned long req, str what) except -1
    cdef void _release_all(self) noexcept
    cdef int _read_ring(self, ring_t *r) noexcept nogil
    cdef int _decode(self, const unsigned char *rec, uint32_t size, mace_event *ev,
                     uint16_t cpu) noexcept nogil
    cdef int16_t _lookup_dev(self, const unsigned char *s, uint32_t n) noexcept nogil
    cdef size_t _release(self, uint64_t horizon) noexcept nogil
    cdef void _log_twins(self, size_t start, size_t end) noexcept nogil
    cdef size_t _before_start(self, ring_t *r, size_t k) noexcept nogil
    cdef bint _old_traced(self, const mace_event *e) noexcept nogil
    cdef size_t _drain(self, bint final, uint64_t horizon) noexcept nogil
