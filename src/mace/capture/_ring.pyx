# cython: language_level=3
"""The hot loop: per-CPU perf rings -> decoded events -> one time-ordered stream.

`Rings` owns the perf fds and their mmaps, drains every CPU's ring with the GIL released,
decodes each tracepoint sample into a 32-byte `mace_event` using field offsets read from
tracefs, and merges the CPUs into timestamp order up to a safe horizon.  Nothing here
allocates a Python object per event; Python sees either a `EventSink` fed in C or, for tests
and small tools, a copy of the batch.
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EINTR, errno
from libc.stdint cimport INT16_MAX, SIZE_MAX, UINT64_MAX, int16_t, int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memmove, memset
from posix.unistd cimport close, read, write

from mace.includes.abi cimport *

import os as _os

DEBUG = bool(MACE_DEBUG_ON)     # built with MACE_DEBUG=1: invariant checks abort on a fault
RECORD_FORMAT = "=QQIIHBBhH"   # struct layout of mace_event, for code that reads raw batches
EVENT_SIZE = sizeof(mace_event)
DEV_NONE = MACE_DEV_NONE
DEV_OTHER = MACE_DEV_OTHER

cdef enum:
    MAX_RECORD = 65536          # perf_event_header.size is a u16
    # sample_type TIME|RAW: header 8, time 8, raw size 4, raw block.  The thread is the raw
    # block's common_pid and the CPU the ring's own (one ring per CPU, SET_OUTPUT only on
    # that CPU): asking the kernel for TID and CPU as well would cost every sample more.
    SAMPLE_TIME_AT = 8
    SAMPLE_RAW_SIZE_AT = 16
    SAMPLE_RAW_AT = 20
    COMMON_PID_AT = 4           # in the raw block's common header
    PAGE = 4096
    MAX_RING_PAGES = 65536      # 256 MiB per CPU; the watermark stays within 32 bits
    MAX_TWINS = 1 << 20         # events logged at a cut (reorder_ns of a full flood is far less)


cdef object _oserror(int err, str op, str what):
    # OSError(errno, strerror, operation): callers switch on `filename` (the operation) and
    # errno, never on the text; `what` says which event or CPU it was about.
    text = _os.strerror(err)
    return OSError(err, f"{text} ({what})" if what else text, op)


cdef class EventSink:
    """Base class of consumers fed by `Rings.feed` without the GIL (see _correlate).

    `consume` returns how many of the n events it took; fewer than n means it is full and
    wants Python to drain it: `Rings.feed` then returns, and hands the rest over first on
    the next call."""

    cdef size_t consume(self, const mace_event *ev, size_t n) noexcept nogil:
        return n


cdef inline void _stage_push(ring_t *r, const mace_event *ev) noexcept nogil:
    # A ring is nearly sorted: an interrupt that fires between a sample taking its timestamp
    # and reserving ring space writes a later timestamp first.  Insertion from the end costs
    # one comparison for in-order events.
    cdef size_t i = r.nstage
    MACE_ASSERT(r.nstage < r.cap, "stage push within its capacity")
    while i > 0 and r.stage[i - 1].ts > ev.ts:
        i -= 1
    if i < r.nstage:
        memmove(&r.stage[i + 1], &r.stage[i], (r.nstage - i) * sizeof(mace_event))
    r.stage[i] = ev[0]
    r.nstage += 1


cdef inline size_t _upper_bound(const mace_event *a, size_t n, uint64_t t) noexcept nogil:
    # first index whose ts > t
    cdef size_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid].ts <= t:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline uint32_t _name_hash(uint64_t a, uint64_t b) noexcept nogil:
    cdef uint64_t h = (a * 0x9E3779B97F4A7C15ULL) ^ (b * 0xC2B2AE3D27D4EB4FULL)
    return <uint32_t>(h >> 32)


cdef class Rings:
    """Per-CPU perf rings for a set of tracepoints, drained into one time-ordered stream.

    Low level: `mace.capture.perf.Capture` decides which tracepoints, filters and devices to use and
    turns errors into advice.  Rings can also be attached to synthetic ring images (any
    writable buffer laid out like a perf mmap: control page then data), which is how the
    decoder is tested without privileges.

    Example (synthetic)::

        rings = Rings(cpus=[0], ring_pages=1, reorder_ns=0)
        kind = rings.add_kind(tp_id=2303, skb_off=8, len_off=16, name_off=20, proto_off=-1, min_raw=24)
        rings.set_devices(["eth0"])
        rings.attach(0, image)          # bytearray(4096 + 4096) with a control page
        n = rings.drain(final=True)
        events = rings.batch()          # list of tuples, RECORD_FORMAT order
    """

    def __cinit__(self):
        self.rings = NULL
        self.kind_of_tp = NULL
        self.devs = NULL
        self.out = NULL
        self.cut = NULL
        self.heap = NULL
        self.pos = NULL
        self.scratch = NULL
        self.twins = NULL
        self.twin_traced = NULL
        self.twin_all = NULL
        self.fds = NULL
        self.fd_kind = NULL
        self.fd_solo = NULL
        self.leader = NULL
        self.views = NULL
        self.draining = False
        self.epfd = -1
        self.evfd = -1
        self.closed = False
        self.enabled = False

    def __init__(self, cpus, int ring_pages=256, int watermark=0, uint64_t reorder_ns=2_000_000,
                 size_t stage_cap=0):
        """cpus: CPU numbers, one ring each.  ring_pages: data pages per ring (a power of two).
        watermark: bytes in a ring before the kernel wakes the reader (0: a quarter of the ring).
        reorder_ns: how long an event is held back waiting for earlier events from other CPUs.
        stage_cap: events held per CPU between drains (0: sized from the ring)."""
        cdef int i
        cdef uint64_t data_size
        if ring_pages <= 0 or ring_pages & (ring_pages - 1) or ring_pages > MAX_RING_PAGES:
            raise ValueError(f"ring_pages must be a power of two up to {MAX_RING_PAGES}, "
                             f"not {ring_pages}")
        self.cpus = [int(c) for c in cpus]
        if not self.cpus:
            raise ValueError("at least one CPU is needed")
        self.nrings = len(self.cpus)
        self.ring_pages = ring_pages
        data_size = <uint64_t>ring_pages * PAGE
        self.watermark = <uint32_t>(watermark if watermark > 0 else data_size // 4)
        if self.watermark >= data_size:
            raise ValueError(f"watermark {watermark} must be smaller than the ring ({data_size} bytes)")
        self.reorder_ns = reorder_ns
        # The smallest sample we decode is 64 bytes; a stage holds a full ring plus what the
        # reorder delay kept back from the previous drain.
        self.stage_cap = stage_cap if stage_cap > 0 else <size_t>(2 * data_size // 64 + 1024)
        # `out` holds every ring's stage at once: a product that wraps would allocate a
        # small buffer that the merge then overruns
        if self.stage_cap > SIZE_MAX // sizeof(mace_event) // <size_t>self.nrings:
            raise OverflowError(f"a stage of {self.stage_cap} events on {self.nrings} CPUs "
                                f"does not fit the address space")
        self.rings = <ring_t *>calloc(self.nrings, sizeof(ring_t))
        self.cut = <size_t *>calloc(self.nrings, sizeof(size_t))
        self.pos = <size_t *>calloc(self.nrings, sizeof(size_t))
        self.heap = <int *>calloc(self.nrings, sizeof(int))
        self.leader = <int *>malloc(self.nrings * sizeof(int))
        self.views = <Py_buffer *>calloc(self.nrings, sizeof(Py_buffer))
        self.kind_of_tp = <uint8_t *>calloc(65536, 1)
        self.scratch = <unsigned char *>malloc(MAX_RECORD + 8)
        self.out = <mace_event *>malloc(self.nrings * self.stage_cap * sizeof(mace_event))
        if (self.rings == NULL or self.cut == NULL or self.pos == NULL or self.heap == NULL
                or self.leader == NULL or self.kind_of_tp == NULL or self.scratch == NULL
                or self.out == NULL or self.views == NULL):
            raise MemoryError()
        for i in range(self.nrings):
            self.leader[i] = -1
            self.rings[i].fd = -1
            self.rings[i].cpu = self.cpus[i]
            self.rings[i].stage = <mace_event *>malloc(self.stage_cap * sizeof(mace_event))
            if self.rings[i].stage == NULL:
                raise MemoryError()
            self.rings[i].cap = self.stage_cap
        self.fds_cap = 16
        self.fds = <int *>malloc(self.fds_cap * sizeof(int))
        self.fd_kind = <uint8_t *>malloc(self.fds_cap)
        self.fd_solo = <uint8_t *>malloc(self.fds_cap)
        if self.fds == NULL or self.fd_kind == NULL or self.fd_solo == NULL:
            raise MemoryError()
        self.nfds = 0
        self.devnames = []
        self.set_devices([])
        cdef int err
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            err = errno
            raise _oserror(err, "epoll_create1", "")
        self.evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.evfd < 0:
            err = errno
            raise _oserror(err, "eventfd", "")
        self._watch(self.evfd, -1)

    def __dealloc__(self):
        self._release_all()
        cdef int i
        if self.rings != NULL:
            for i in range(self.nrings):
                free(self.rings[i].stage)
        free(self.rings)
        free(self.cut)
        free(self.pos)
        free(self.heap)
        free(self.leader)
        free(self.views)
        free(self.kind_of_tp)
        free(self.scratch)
        free(self.twins)
        free(self.twin_traced)
        free(self.twin_all)
        free(self.out)
        free(self.fds)
        free(self.fd_kind)
        free(self.fd_solo)
        free(self.devs)

    # -- configuration ---------------------------------------------------------------------

    def add_kind(self, int tp_id, int skb_off, int len_off, int name_off, int proto_off,
                 int min_raw, int name_size=0):
        """Register a tracepoint by its id and field offsets (-1: absent); returns its kind.
        The name is a __data_loc string, or with `name_size` a char array of that size in
        place (fib:fib_table_lookup's)."""
        if self.nkinds >= 255:
            raise ValueError("too many tracepoints (255 at most)")
        if not 0 <= tp_id < 65536:
            raise ValueError(f"tracepoint id {tp_id} does not fit common_type (u16)")
        if self.kind_of_tp[tp_id]:
            raise ValueError(f"tracepoint id {tp_id} added twice")
        # the decoder reads fields without checking each one against the record: min_raw
        # must cover them all
        if not 0 <= name_size <= 64:
            raise ValueError(f"tracepoint {tp_id}: a name of {name_size} bytes")
        for off, size in ((skb_off, 8), (len_off, 4), (name_off, name_size or 4), (proto_off, 2)):
            if off >= 0 and off + size > min_raw:
                raise ValueError(f"tracepoint {tp_id}: field at {off} lies outside min_raw {min_raw}")
            if off < -1:
                raise ValueError(f"tracepoint {tp_id}: bad field offset {off}")
        cdef kind_t *k = &self.kinds[self.nkinds]
        k.tp_id = tp_id
        k.skb_off = skb_off
        k.len_off = len_off
        k.name_off = name_off
        k.name_size = name_size
        k.proto_off = proto_off
        k.min_raw = max(min_raw, 8)
        self.kind_of_tp[tp_id] = self.nkinds + 1
        self.nkinds += 1
        return self.nkinds - 1

    def set_devices(self, names):
        """Device names to resolve into slots (slot = position in `names`; None leaves a
        slot unused).  May be called while the events are enabled, but not while another
        thread drains: the decoder reads the table without a lock."""
        cdef uint32_t cap = 16, h
        cdef uint64_t key[2]
        cdef bytes raw
        if self.draining:
            raise RuntimeError("set_devices() while another thread drains the rings")
        names = list(names)
        if len(names) > INT16_MAX:
            raise ValueError("too many devices")
        while cap < 2 * len(names):
            cap <<= 1
        cdef devkey_t *devs = <devkey_t *>malloc(cap * sizeof(devkey_t))
        if devs == NULL:
            raise MemoryError()
        for h in range(cap):
            devs[h].slot = -1
        for slot, name in enumerate(names):
            if name is None:
                continue
            raw = name.encode() if isinstance(name, str) else bytes(name)
            if not 0 < len(raw) < 16 or b"\0" in raw:
                free(devs)
                raise ValueError(f"{name!r} is not a device name (1 to 15 bytes)")
            key[0] = key[1] = 0
            memcpy(key, <const char *>raw, len(raw))
            h = _name_hash(key[0], key[1]) & (cap - 1)
            while devs[h].slot != -1:
                if devs[h].a == key[0] and devs[h].b == key[1]:
                    free(devs)
                    raise ValueError(f"device {name!r} listed twice")
                h = (h + 1) & (cap - 1)
            devs[h].a = key[0]
            devs[h].b = key[1]
            devs[h].slot = slot
        free(self.devs)
        self.devs = devs
        self.devmask = cap - 1
        self.devnames = names

    def device_slot(self, name):
        """Slot of a device name as the decoder resolves it (DEV_OTHER when unknown)."""
        cdef bytes raw = name.encode()
        if self.draining:
            raise RuntimeError("device_slot() while another thread drains the rings")
        return self._lookup_dev(<const unsigned char *>raw, len(raw) + 1)

    @property
    def devices(self):
        return list(self.devnames)

    @property
    def cpu_list(self):
        return list(self.cpus)

    # -- perf syscalls ---------------------------------------------------------------------

    def open_event(self, int kind, int ring, filter=None, str label="", int cgroup_fd=-1):
        """Open the tracepoint of `kind` on the CPU of ring `ring`; the first event of a ring
        owns and maps its buffer, the others are redirected into it.  Returns the fd.

        With `cgroup_fd` (a cgroup v2 directory) the event samples only while a process of
        that cgroup runs on the CPU (PERF_FLAG_PID_CGROUP).  Such an event is a group of its
        own: a cgroup-bound member of an unbound group would be scheduled with the group,
        whatever runs.  It writes into the ring's buffer all the same (SET_OUTPUT), so its
        ring needs its leader, an unbound event, first."""
        cdef bint solo = cgroup_fd >= 0
        cdef perf_event_attr attr
        cdef int fd, lead, err
        cdef void *mem
        cdef size_t map_len
        cdef bytes fbytes
        if self.closed:
            raise ValueError("rings are closed")
        if not 0 <= kind < self.nkinds or not 0 <= ring < self.nrings:
            raise ValueError("no such kind or ring")
        lead = self.leader[ring]
        if solo and lead < 0:
            raise ValueError("a cgroup-bound event needs its ring's leader (an unbound event) first")
        memset(&attr, 0, sizeof(attr))
        attr.size = sizeof(attr)
        attr.type = PERF_TYPE_TRACEPOINT
        attr.config = self.kinds[kind].tp_id
        attr.sample_period = 1
        attr.sample_type = PERF_SAMPLE_TIME | PERF_SAMPLE_RAW
        attr.use_clockid = 1
        attr.clockid = CLOCK_MONOTONIC
        attr.watermark = 1
        attr.wakeup_watermark = self.watermark
        # One group per CPU, so the leader's group enable/disable switches every event of
        # that CPU at once; members follow the leader and are therefore not disabled.
        attr.disabled = 1 if lead < 0 or solo else 0
        if solo:
            fd = mace_perf_event_open(&attr, cgroup_fd, self.rings[ring].cpu, -1,
                                      PERF_FLAG_FD_CLOEXEC | PERF_FLAG_PID_CGROUP)
        else:
            fd = mace_perf_event_open(&attr, -1, self.rings[ring].cpu, lead, PERF_FLAG_FD_CLOEXEC)
        if fd < 0:
            err = errno
            raise _oserror(err, "perf_event_open",
                           f"{label or self.kinds[kind].tp_id} on cpu {self.rings[ring].cpu}")
        self._track(fd, kind, solo)
        if filter:
            fbytes = filter.encode()
            if ioctl(fd, PERF_EVENT_IOC_SET_FILTER, <const char *>fbytes) < 0:
                err = errno
                raise _oserror(err, "SET_FILTER", f"{label}: {filter}")
        if lead < 0:
            map_len = (1 + <size_t>self.ring_pages) * PAGE
            mem = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
            if mem == MAP_FAILED:
                err = errno
                raise _oserror(err, "mmap", f"{self.ring_pages} ring pages on cpu {self.rings[ring].cpu}")
            try:
                self._map(ring, <unsigned char *>mem, map_len, fd)
            except BaseException:
                munmap(mem, map_len)
                raise
            self.leader[ring] = fd
            self._watch(fd, ring)
        elif ioctl(fd, PERF_EVENT_IOC_SET_OUTPUT, lead) < 0:
            err = errno
            raise _oserror(err, "SET_OUTPUT", f"{label} on cpu {self.rings[ring].cpu}")
        return fd

    cdef int _track(self, int fd, int kind, bint solo) except -1:
        cdef int *grown
        cdef uint8_t *kinds
        cdef uint8_t *solos
        if self.nfds == self.fds_cap:
            grown = <int *>malloc(2 * self.fds_cap * sizeof(int))
            kinds = <uint8_t *>malloc(2 * self.fds_cap)
            solos = <uint8_t *>malloc(2 * self.fds_cap)
            if grown == NULL or kinds == NULL or solos == NULL:
                free(grown)
                free(kinds)
                free(solos)
                close(fd)
                raise MemoryError()
            memcpy(grown, self.fds, self.nfds * sizeof(int))
            memcpy(kinds, self.fd_kind, self.nfds)
            memcpy(solos, self.fd_solo, self.nfds)
            free(self.fds)
            free(self.fd_kind)
            free(self.fd_solo)
            self.fds = grown
            self.fd_kind = kinds
            self.fd_solo = solos
            self.fds_cap *= 2
        self.fds[self.nfds] = fd
        self.fd_kind[self.nfds] = <uint8_t>kind
        self.fd_solo[self.nfds] = solo
        self.nfds += 1
        return 0

    def kind_counts(self):
        """Per kind: (events the kernel counted, samples decoded).

        A perf event counts every tracepoint hit that passes its filter, before it tries to
        write a sample.  Once the events are disabled and the rings drained, hits minus
        samples minus `lost` is what the kernel dropped without saying so."""
        cdef int i
        cdef uint64_t v
        hits = [0] * self.nkinds
        for i in range(self.nfds):
            if read(self.fds[i], &v, 8) == 8:
                hits[self.fd_kind[i]] += v
        return [(hits[k], self.ksamples[k]) for k in range(self.nkinds)]

    cdef int _watch(self, int fd, int ring) except -1:
        cdef epoll_event ev
        cdef int err
        ev.events = EPOLLIN
        ev.data.u64 = <uint64_t>(ring + 1)
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            err = errno
            raise _oserror(err, "epoll_ctl", "")
        return 0

    cdef int _map(self, int ring, unsigned char *mem, size_t map_len, int fd) except -1:
        cdef ring_t *r = &self.rings[ring]
        cdef perf_event_mmap_page *meta = <perf_event_mmap_page *>mem
        cdef uint64_t off = meta.data_offset, size = meta.data_size
        if off == 0:             # kernels before 4.1 leave these zero
            off = PAGE
            size = map_len - PAGE
        if size < 8 or size & (size - 1) or off + size > map_len:
            raise ValueError(f"ring {ring}: data area {off}+{size} does not fit {map_len} bytes")
        r.meta = meta
        r.data = mem + off
        r.size = size
        r.map_len = map_len
        r.fd = fd
        return 0

    def attach(self, int ring, buf):
        """Read ring `ring` from a synthetic image: a writable buffer holding a control page
        (data_head, data_tail, data_offset, data_size at 1024..1056) and the data area."""
        cdef Py_buffer *view
        if self.closed or self.closing:
            raise ValueError("rings are closed")
        if not 0 <= ring < self.nrings:
            raise ValueError("no such ring")
        if self.rings[ring].meta != NULL:
            raise ValueError(f"ring {ring} already has a buffer")
        # The export is held until the rings let go (close, dealloc): while it is, the owner
        # cannot resize or free the memory under the reader (a bytearray raises BufferError).
        view = &self.views[ring]
        try:
            PyObject_GetBuffer(buf, view, PyBUF_WRITABLE)
        except BaseException:
            view.buf = NULL
            raise
        try:
            if view.len < 1056:
                raise ValueError("image smaller than a control page")
            self._map(ring, <unsigned char *>view.buf, view.len, -1)
            self.rings[ring].map_len = 0      # not ours to unmap
        except BaseException:
            PyBuffer_Release(view)
            view.buf = NULL             # buf marks a held view
            raise

    def enable(self):
        """Start every event on every CPU (one group ioctl per CPU)."""
        self._group_ioctl(PERF_EVENT_IOC_ENABLE, "ENABLE")
        self.enabled = True

    def disable(self):
        if self.enabled:
            self.enabled = False
            self._group_ioctl(PERF_EVENT_IOC_DISABLE, "DISABLE")

    cdef int _group_ioctl(self, unsigned long req, str what) except -1:
        cdef int i, err
        for i in range(self.nrings):
            if self.leader[i] >= 0 and ioctl(self.leader[i], req, PERF_IOC_FLAG_GROUP) < 0:
                err = errno
                raise _oserror(err, what, f"cpu {self.rings[i].cpu}")
        for i in range(self.nfds):
            if self.fd_solo[i] and ioctl(self.fds[i], req, 0) < 0:
                err = errno
                raise _oserror(err, what, "a cgroup-bound event")
        return 0

    def close(self):
        """Disable the events, unmap the rings and close every fd.  Idempotent.

        Safe while another thread is inside wait(), drain() or feed(): that thread is woken
        and the last one out releases everything."""
        if self.busy:
            self.closing = True
            self.wakeup()
            return
        self._release_all()

    cdef int _enter(self) except -1:
        # Called with the GIL before every section that releases it.
        if self.closed or self.closing:
            raise ValueError("rings are closed")
        self.busy += 1
        return 0

    cdef void _leave(self) noexcept:
        self.busy -= 1
        if self.closing and self.busy == 0:
            self._release_all()

    cdef int _enter_drain(self) except -1:
        # One drainer at a time: the stages, the batch and the merge scratch are shared.
        # Checked and set with the GIL held, so two threads cannot both get in.
        if self.draining:
            raise RuntimeError("drain() or feed() while another thread drains these rings")
        self._enter()
        self.draining = True
        return 0

    cdef void _leave_drain(self) noexcept:
        self.draining = False
        self._leave()

    cdef void _release_all(self) noexcept:
        cdef int i
        if self.closed:
            return
        self.closed = True
        if self.leader != NULL:
            for i in range(self.nrings):
                if self.leader[i] >= 0:
                    ioctl(self.leader[i], PERF_EVENT_IOC_DISABLE, PERF_IOC_FLAG_GROUP)
            for i in range(self.nfds):
                if self.fd_solo[i]:
                    ioctl(self.fds[i], PERF_EVENT_IOC_DISABLE, 0)
        if self.rings != NULL:
            for i in range(self.nrings):
                if self.rings[i].map_len:
                    munmap(<void *>self.rings[i].meta, self.rings[i].map_len)
                self.rings[i].map_len = 0
                self.rings[i].meta = NULL
                self.rings[i].data = NULL
        if self.views != NULL:
            for i in range(self.nrings):
                if self.views[i].buf != NULL:
                    PyBuffer_Release(&self.views[i])
                    self.views[i].buf = NULL
        # members before leaders: a leader's fd keeps the group alive
        if self.fds != NULL:
            for i in range(self.nfds - 1, -1, -1):
                close(self.fds[i])
            self.nfds = 0
        if self.leader != NULL:
            for i in range(self.nrings):
                self.leader[i] = -1
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1
        if self.evfd >= 0:
            close(self.evfd)
            self.evfd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    @property
    def fds_open(self):
        """The perf fds currently open (for leak checks)."""
        return [self.fds[i] for i in range(self.nfds)]

    # -- waiting ---------------------------------------------------------------------------

    def wait(self, int timeout_ms):
        """Block until a ring passes its watermark, `wakeup()` is called, or the timeout.
        The GIL is released; a signal ends the wait so Python can handle it."""
        cdef epoll_event evs[64]
        cdef int n, err = 0, epfd = self.epfd, evfd = self.evfd
        cdef uint64_t junk
        self._enter()
        try:
            with nogil:
                n = epoll_wait(epfd, evs, 64, timeout_ms)
                if n < 0:
                    err = errno
                else:
                    read(evfd, &junk, 8)
        finally:
            self._leave()
        if n < 0:
            if err == EINTR:
                PyErr_CheckSignals()
                return 0
            raise _oserror(err, "epoll_wait", "")
        return n

    def wakeup(self):
        """Make a concurrent or the next `wait()` return at once (any thread)."""
        cdef uint64_t one = 1
        if self.evfd >= 0:
            write(self.evfd, &one, 8)

    # -- the hot loop ----------------------------------------------------------------------

    cdef int _read_ring(self, ring_t *r) noexcept nogil:
        # Returns 1 when the stage filled up before the ring was empty.
        cdef uint64_t head, tail, avail, off, first
        cdef uint32_t size, rtype
        cdef const unsigned char *rec
        cdef mace_event ev
        cdef int rc, full = 0
        if r.meta == NULL:
            return 0
        head = mace_load_acquire(&r.meta.data_head)
        tail = r.meta.data_tail
        if head - tail > r.size or tail & 7:
            # a control page no kernel writes: resynchronise rather than read past the area
            r.st.errors += 1
            mace_store_release(&r.meta.data_tail, head)
            return 0
        MACE_ASSERT(r.size >= 8 and (r.size & (r.size - 1)) == 0, "ring size a power of two")
        MACE_ASSERT(r.nstage <= self.stage_cap, "stage count within its capacity")
        while tail != head:
            MACE_ASSERT(head - tail <= r.size, "tail and head within one ring of each other")
            avail = head - tail
            off = tail & (r.size - 1)
            MACE_ASSERT(off + 8 <= r.size, "record header inside the data area")
            # Records are 8-byte aligned and the area a multiple of 8: a header never wraps.
            size = (<perf_event_header *>(r.data + off)).size
            rtype = (<perf_event_header *>(r.data + off)).type
            if size < 8 or size & 7 or size > avail:
                r.st.errors += 1
                tail = head             # nothing after a broken record can be trusted
                break
            if rtype == PERF_RECORD_SAMPLE and r.nstage == self.stage_cap:
                full = 1                # leave it in the ring; the caller releases and retries
                break
            MACE_ASSERT(size <= MAX_RECORD and size <= r.size, "record fits the scratch and the ring")
            if off + size <= r.size:
                rec = r.data + off
            else:                       # slow path: the record wraps, reassemble it
                first = r.size - off
                MACE_ASSERT(first < size and size - first <= off, "wrapped record parts inside the data area")
                memcpy(self.scratch, r.data + off, first)
                memcpy(self.scratch + first, r.data, size - first)
                rec = self.scratch
            r.st.records += 1
            if rtype == PERF_RECORD_SAMPLE:
                rc = self._decode(rec, size, &ev, <uint16_t>r.cpu)
                if rc == 1:
                    r.st.samples += 1
                    self.ksamples[ev.kind] += 1
                    if ev.ts < self.released_ts:
                        r.st.late += 1
                    _stage_push(r, &ev)
                elif rc == 0:
                    r.st.unknown += 1
                elif rc == -2:
                    r.st.errors += 1
                else:
                    r.st.errors += 1
                    tail = head
                    break
            elif rtype == PERF_RECORD_LOST:
                if size >= 24:
                    r.st.lost += mace_load_u64(rec + 16)
                else:
                    r.st.errors += 1
            elif rtype == PERF_RECORD_THROTTLE or rtype == PERF_RECORD_UNTHROTTLE:
                r.st.throttled += 1
            else:
                r.st.unknown += 1
            tail += size
        MACE_ASSERT(head - tail <= r.size, "tail not past head")
        MACE_ASSERT(r.nstage <= self.stage_cap, "stage count within its capacity")
        mace_store_release(&r.meta.data_tail, tail)
        return full

    cdef int _decode(self, const unsigned char *rec, uint32_t size, mace_event *ev,
                     uint16_t cpu) noexcept nogil:
        # 1: decoded; 0: a tracepoint we did not register; -1: the record is malformed (stop);
        # -2: a field points outside the record (skip it).
        cdef uint32_t raw_size, loc, noff, nlen
        cdef const unsigned char *raw
        cdef const kind_t *k
        cdef uint8_t idx
        if size < SAMPLE_RAW_AT + 8:
            return -1
        raw_size = mace_load_u32(rec + SAMPLE_RAW_SIZE_AT)
        if raw_size < 8 or raw_size > size - SAMPLE_RAW_AT:
            return -1
        raw = rec + SAMPLE_RAW_AT
        idx = self.kind_of_tp[mace_load_u16(raw)]
        if idx == 0:
            return 0
        MACE_ASSERT(idx <= self.nkinds, "kind table entry registered")
        k = &self.kinds[idx - 1]
        if raw_size < k.min_raw:
            return -2
        # add_kind checked every field against min_raw; the record holds at least that much
        MACE_ASSERT(SAMPLE_RAW_AT + raw_size <= size, "raw block inside the record")
        MACE_ASSERT(k.skb_off < 0 or <uint32_t>k.skb_off + 8 <= raw_size, "skbaddr inside the raw block")
        MACE_ASSERT(k.len_off < 0 or <uint32_t>k.len_off + 4 <= raw_size, "len inside the raw block")
        MACE_ASSERT(k.name_off < 0 or <uint32_t>k.name_off + (k.name_size or 4) <= raw_size,
                    "name inside the raw block")
        MACE_ASSERT(k.proto_off < 0 or <uint32_t>k.proto_off + 2 <= raw_size, "protocol inside the raw block")
        ev.tid = mace_load_u32(raw + COMMON_PID_AT)
        ev.ts = mace_load_u64(rec + SAMPLE_TIME_AT)
        ev.cpu = cpu
        ev.kind = idx - 1
        ev.flags = raw[2]
        ev.skb = mace_load_u64(raw + k.skb_off) if k.skb_off >= 0 else 0
        ev.len = mace_load_u32(raw + k.len_off) if k.len_off >= 0 else 0
        ev.proto = mace_load_u16(raw + k.proto_off) if k.proto_off >= 0 else 0
        if k.name_off >= 0 and k.name_size:
            ev.dev = self._lookup_dev(raw + k.name_off, k.name_size)
        elif k.name_off >= 0:
            loc = mace_load_u32(raw + k.name_off)
            noff = loc & 0xffff
            nlen = loc >> 16
            if noff + nlen > raw_size:
                return -2
            ev.dev = self._lookup_dev(raw + noff, nlen)
        else:
            ev.dev = MACE_DEV_NONE
        return 1

    cdef int16_t _lookup_dev(self, const unsigned char *s, uint32_t n) noexcept nogil:
        cdef uint64_t key[2]
        cdef uint32_t l = 0, h
        while l < n and l < 16 and s[l] != 0:
            l += 1
        if l == 0 or l == 16:           # IFNAMSIZ is 16 with the NUL: not a device we know
            return MACE_DEV_OTHER
        key[0] = 0
        key[1] = 0
        memcpy(key, s, l)
        h = _name_hash(key[0], key[1]) & self.devmask
        while self.devs[h].slot != -1:
            if self.devs[h].a == key[0] and self.devs[h].b == key[1]:
                return <int16_t>self.devs[h].slot
            h = (h + 1) & self.devmask
        return MACE_DEV_OTHER

    cdef size_t _release(self, uint64_t horizon) noexcept nogil:
        # Move every staged event with ts <= horizon into `out`, merged across rings.
        cdef int i, j, hn = 0
        cdef size_t n = self.nout, total = 0
        cdef ring_t *r
        for i in range(self.nrings):
            r = &self.rings[i]
            self.cut[i] = _upper_bound(r.stage, r.nstage, horizon)
            MACE_ASSERT(self.cut[i] <= r.nstage and r.nstage <= self.stage_cap, "release cut within the stage")
            self.pos[i] = 0
            if self.cut[i]:
                total += self.cut[i]
                self.heap[hn] = i
                hn += 1
        if total == 0:
            return 0
        MACE_ASSERT(n + total <= <size_t>self.nrings * self.stage_cap, "batch within `out`")
        if hn == 1:
            i = self.heap[0]
            memcpy(&self.out[n], self.rings[i].stage, self.cut[i] * sizeof(mace_event))
            n += self.cut[i]
        else:
            # k-way merge with a binary min-heap of ring indices keyed by their next event
            for j in range(hn // 2 - 1, -1, -1):
                _sift(self.heap, hn, j, self.rings, self.pos)
            while hn > 0:
                i = self.heap[0]
                self.out[n] = self.rings[i].stage[self.pos[i]]
                n += 1
                self.pos[i] += 1
                MACE_ASSERT(self.pos[i] <= self.cut[i] and n <= <size_t>self.nrings * self.stage_cap,
                            "merge within the released events")
                if self.pos[i] == self.cut[i]:
                    hn -= 1
                    self.heap[0] = self.heap[hn]
                if hn > 0:
                    _sift(self.heap, hn, 0, self.rings, self.pos)
        for i in range(self.nrings):
            r = &self.rings[i]
            if self.cut[i]:
                r.nstage -= self.cut[i]
                memmove(r.stage, &r.stage[self.cut[i]], r.nstage * sizeof(mace_event))
        if self.out[n - 1].ts > self.released_ts:
            self.released_ts = self.out[n - 1].ts
        if self.until:
            self._log_twins(self.nout, n)
        self.nout = n
        return total

    cdef void _log_twins(self, size_t start, size_t end) noexcept nogil:
        # What this capture delivers just before its cut, for the successor's start_at().
        cdef size_t i, cap
        cdef mace_event *grown
        for i in range(start, end):
            if self.out[i].ts < self.log_from:
                continue
            if self.ntwins == self.twins_cap:
                cap = self.twins_cap * 2 if self.twins_cap else 1024
                grown = NULL
                if cap <= MAX_TWINS:
                    grown = <mace_event *>realloc(self.twins, cap * sizeof(mace_event))
                if grown == NULL:
                    if not self.log_short:
                        self.log_short = True
                        self.inexact += 1
                    return
                self.twins = grown
                self.twins_cap = cap
            MACE_ASSERT(self.ntwins < self.twins_cap, "twin log within its capacity")
            self.twins[self.ntwins] = self.out[i]
            self.ntwins += 1

    cdef size_t _before_start(self, ring_t *r, size_t k) noexcept nogil:
        # The first k staged events are stamped before `since`.  A hit that both captures
        # recorded is stamped twice, first by the newer event (perf_trace_add puts it at
        # the head of the tracepoint's list) and one sample later, up to tens of µs when an
        # interrupt falls in between, by the older one.  The older capture delivered the
        # hits it stamped before the cut; each other hit is delivered here.  Hits of one
        # key (CPU, thread, tracepoint, skb, ...) are serialized, so a copy here has its
        # twin among the older capture's copies stamped after it, if any is.  Returns how
        # many of the k remain, restamped at `since` (the cut falls between their stamps).
        cdef size_t j, t, w = 0
        cdef mace_event *e
        cdef mace_event *o
        cdef bint twin
        for j in range(k):
            e = &r.stage[j]
            if e.ts < self.twins_from:
                continue
            twin = False
            for t in range(self.ntwins):
                o = &self.twins[t]
                if (o.ts >= e.ts and o.cpu == e.cpu and o.kind == e.kind and o.skb == e.skb
                        and o.tid == e.tid and o.len == e.len and o.dev == e.dev
                        and o.proto == e.proto and o.flags == e.flags):
                    twin = True
                    break
            if not twin and self._old_traced(e):
                r.stage[w] = e[0]
                r.stage[w].ts = self.since
                w += 1
        MACE_ASSERT(w <= k, "kept events among the examined ones")
        r.st.straddled += w
        return w

    cdef bint _old_traced(self, const mace_event *e) noexcept nogil:
        # Could the older capture have recorded this hit?  Its filters may have passed fewer
        # devices (update() adds containers): a hit it could not see has no twin because it
        # was never its own, and belongs to neither capture before the cut.
        if self.twin_all == NULL:
            return True
        if e.kind >= self.twin_rows:
            return False
        if self.twin_all[e.kind]:
            return True
        return 0 <= e.dev < self.twin_cols and self.twin_traced[e.kind * self.twin_cols + e.dev] != 0

    cdef size_t _drain(self, bint final, uint64_t horizon) noexcept nogil:
        cdef int i, full
        cdef size_t k, kept
        cdef bint stalled = False
        cdef uint64_t now = monotonic_ns(), forced = 0
        self.nout = 0
        self.out_pos = 0
        for i in range(self.nrings):
            full = self._read_ring(&self.rings[i])
            if self.until:
                # a newer capture has everything from `until` on (see cut_at)
                k = _upper_bound(self.rings[i].stage, self.rings[i].nstage, self.until - 1)
                self.rings[i].st.cut += self.rings[i].nstage - k
                self.rings[i].nstage = k
            if self.since:
                # an older capture delivered the hits before `since` (see start_at)
                k = _upper_bound(self.rings[i].stage, self.rings[i].nstage, self.since - 1)
                if k:
                    kept = self._before_start(&self.rings[i], k)
                    self.rings[i].st.cut += k - kept
                    self.rings[i].nstage -= k - kept
                    memmove(&self.rings[i].stage[kept], &self.rings[i].stage[k],
                            (self.rings[i].nstage - kept) * sizeof(mace_event))
            if full:
                stalled = True
                # release everything this ring holds so its stage can take the rest
                if self.rings[i].nstage:
                    if self.rings[i].stage[self.rings[i].nstage - 1].ts > forced:
                        forced = self.rings[i].stage[self.rings[i].nstage - 1].ts
                    self.rings[i].st.forced += 1
        if final:
            horizon = UINT64_MAX
        elif horizon == 0:
            # Anything a CPU has not published by `now` carries a later timestamp, unless it
            # was being written as we looked: reorder_ns bounds that window.
            horizon = now - self.reorder_ns if now > self.reorder_ns else 0
        if forced > horizon:
            horizon = forced
        self.more = stalled
        self._release(horizon)
        self.drained += self.nout
        return self.nout

    def drain(self, bint final=False, uint64_t horizon=0):
        """Read every ring and release the events that are safe to order into the batch
        (all of them when `final`).  `horizon` overrides the release time (tests).  Returns
        the batch size; `more` is then true if a ring still holds events.  Not to be mixed
        with feed() on the same rings: a batch a sink left unfinished would be replaced."""
        cdef size_t n
        self._enter_drain()
        try:
            with nogil:
                n = self._drain(final, horizon)
                self.out_pos = n            # the batch is the caller's now
        finally:
            self._leave_drain()
        return n

    def feed(self, EventSink sink, bint final=False, uint64_t horizon=0):
        """Drain into `sink` until no ring stalls or the sink asks to be drained; returns the
        number of events fed (check `more` to know whether events are still waiting)."""
        cdef size_t k, total = 0
        cdef bint drained = False
        self._enter_drain()
        try:
            with nogil:
                while True:
                    if self.out_pos < self.nout:
                        k = sink.consume(self.out + self.out_pos, self.nout - self.out_pos)
                        self.out_pos += k
                        total += k
                        if self.out_pos < self.nout:
                            break               # the sink is full: Python empties it first
                    if drained and not self.more:
                        break
                    self._drain(final, horizon)
                    drained = True
                    if self.nout == 0 and not self.more:
                        break
        finally:
            self._leave_drain()
        return total

    def cut_at(self, uint64_t ts):
        """From now on, discard events stamped at or after `ts` (counted as `cut`), and log
        the events released from `ts - reorder_ns` on (twin_log()).

        This is how a capture hands over to its successor without a gap or a duplicate: the
        successor is enabled first, `ts` is taken once it runs on every CPU, and the old
        capture is then stopped and drained up to `ts` while the new one delivers from it
        (start_at with this capture's twin_log(): a hit stamped on both sides of `ts` is
        delivered by the successor, once)."""
        self.until = ts
        self.log_from = ts - self.reorder_ns if ts > self.reorder_ns else 1
        self.ntwins = 0
        self.log_short = False
        if self.released_ts >= self.log_from:
            self.inexact += 1       # a stage filled and was released past the log's start

    def twin_log(self):
        """(from, packed events): what this capture delivered from `from` up to its cut."""
        return self.log_from, (<char *>self.twins)[:self.ntwins * sizeof(mace_event)] if self.ntwins else b""

    def start_at(self, uint64_t ts, twins=None, traced=None):
        """Discard the hits the older capture delivered (counted as `cut`): the successor's
        half of cut_at.  `twins` is the older capture's twin_log() after its last drain;
        without it, every event stamped before `ts` is discarded.  `traced`, per kind (in
        add_kind order), the device slots the older capture's filter passed (None: all of
        them); without it, the older capture is taken to have traced what this one does."""
        cdef const unsigned char[::1] raw
        cdef size_t n = 0
        self.since = ts
        self.twins_from = ts
        if traced is not None:
            self._set_traced(traced)
        if twins is None:
            return
        start, packed = twins
        raw = packed
        if len(raw) % sizeof(mace_event):
            raise ValueError(f"twins hold {len(raw)} bytes, not whole events")
        n = len(raw) // sizeof(mace_event)
        free(self.twins)
        self.twins = NULL
        self.ntwins = self.twins_cap = 0
        if n:
            self.twins = <mace_event *>malloc(n * sizeof(mace_event))
            if self.twins == NULL:
                raise MemoryError()
            memcpy(self.twins, &raw[0], n * sizeof(mace_event))
            self.ntwins = self.twins_cap = n
        self.twins_from = min(<uint64_t>start, ts)

    def _set_traced(self, traced):
        cdef int k, d, rows = len(traced), cols = 1
        for slots in traced:
            if slots is not None:
                for d in slots:
                    if d < 0:
                        raise ValueError(f"device slot {d} is not a slot")
                    cols = max(cols, d + 1)
        free(self.twin_traced)
        free(self.twin_all)
        self.twin_traced = <uint8_t *>calloc(max(rows, 1) * cols, 1)
        self.twin_all = <uint8_t *>calloc(max(rows, 1), 1)
        if self.twin_traced == NULL or self.twin_all == NULL:
            raise MemoryError()
        self.twin_rows = rows
        self.twin_cols = cols
        for k, slots in enumerate(traced):
            if slots is None:
                self.twin_all[k] = 1
            else:
                for d in slots:
                    self.twin_traced[k * cols + d] = 1

    @property
    def more(self):
        """A ring still holds events, or a sink has not taken all of the last batch."""
        return self.more or self.out_pos < self.nout

    def batch(self):
        """The last batch as a list of tuples in RECORD_FORMAT order (tests, small tools)."""
        cdef size_t i
        cdef mace_event *e
        out = []
        for i in range(self.nout):
            e = &self.out[i]
            out.append((e.ts, e.skb, e.len, e.tid, e.cpu, e.kind, e.flags, e.dev, e.proto))
        return out

    def batch_bytes(self):
        """The last batch as packed bytes (RECORD_FORMAT per event)."""
        return (<char *>self.out)[:self.nout * sizeof(mace_event)]

    def stats(self):
        """Counters summed over the rings, plus `pending` (staged, not yet released)."""
        keys = ("records", "samples", "lost", "throttled", "unknown", "errors", "late", "forced",
                "cut", "straddled", "pending")
        total = dict.fromkeys(keys, 0)
        for c in self.ring_stats():
            for k in keys:
                total[k] += c[k]
        total["drained"] = self.drained
        total["inexact"] = self.inexact
        return total

    def ring_stats(self):
        """Counters of each ring, in ring order."""
        cdef int i
        cdef ring_t *r
        out = []
        for i in range(self.nrings):
            r = &self.rings[i]
            out.append(dict(cpu=r.cpu, records=r.st.records, samples=r.st.samples, lost=r.st.lost,
                            throttled=r.st.throttled, unknown=r.st.unknown, errors=r.st.errors,
                            late=r.st.late, forced=r.st.forced, cut=r.st.cut, straddled=r.st.straddled,
                            pending=r.nstage))
        return out


cdef inline void _sift(int *heap, int n, int j, ring_t *rings, size_t *pos) noexcept nogil:
    cdef int c, t
    while True:
        c = 2 * j + 1
        if c >= n:
            return
        if c + 1 < n and _before(rings, pos, heap[c + 1], heap[c]):
            c += 1
        if not _before(rings, pos, heap[c], heap[j]):
            return
        t = heap[c]
        heap[c] = heap[j]
        heap[j] = t
        j = c


cdef inline bint _before(ring_t *rings, size_t *pos, int a, int b) noexcept nogil:
    # Ties go to the lower ring index, so the merged order is deterministic.
    cdef uint64_t ta = rings[a].stage[pos[a]].ts, tb = rings[b].stage[pos[b]].ts
    return ta < tb or (ta == tb and a < b)
