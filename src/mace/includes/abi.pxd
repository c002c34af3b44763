# C declarations used by the hot loop: the perf ABI, mmap, epoll and our record type.
# Only the fields mace touches are declared; everything is nogil.

from libc.stdint cimport int16_t, int32_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "mace_abi.h" nogil:
    ctypedef struct mace_event:
        uint64_t ts
        uint64_t skb
        uint32_t len
        uint32_t tid
        uint16_t cpu
        uint8_t kind
        uint8_t flags
        int16_t dev
        uint16_t proto

    enum:
        MACE_DEV_NONE
        MACE_DEV_OTHER

    uint64_t mace_load_acquire(const uint64_t *p)
    void mace_store_release(uint64_t *p, uint64_t v)
    uint64_t mace_load_u64(const unsigned char *p)
    uint32_t mace_load_u32(const unsigned char *p)
    uint16_t mace_load_u16(const unsigned char *p)

    # perf_event_attr is a kernel struct full of bitfields; Cython only emits `attr.field = v`,
    # and the C compiler places the bits.
    struct perf_event_attr:
        uint32_t type
        uint32_t size
        uint64_t config
        uint64_t sample_period
        uint64_t sample_type
        uint64_t read_format
        uint64_t disabled
        uint64_t watermark
        uint64_t use_clockid
        uint32_t wakeup_watermark
        int32_t clockid

    int mace_perf_event_open(perf_event_attr *attr, int pid, int cpu, int group_fd,
                             unsigned long flags)

    struct perf_event_mmap_page:
        uint64_t data_head
        uint64_t data_tail
        uint64_t data_offset
        uint64_t data_size

    struct perf_event_header:
        uint32_t type
        uint16_t misc
        uint16_t size

    enum:
        PERF_TYPE_TRACEPOINT
        PERF_SAMPLE_TID
        PERF_SAMPLE_TIME
        PERF_SAMPLE_CPU
        PERF_SAMPLE_RAW
        PERF_RECORD_LOST
        PERF_RECORD_THROTTLE
        PERF_RECORD_UNTHROTTLE
        PERF_RECORD_SAMPLE
        PERF_IOC_FLAG_GROUP
        PERF_FLAG_FD_CLOEXEC
        PERF_FLAG_PID_CGROUP

    # ioctl request numbers are macros built with _IO/_IOW.
    const unsigned long PERF_EVENT_IOC_ENABLE
    const unsigned long PERF_EVENT_IOC_DISABLE
    const unsigned long PERF_EVENT_IOC_SET_OUTPUT
    const unsigned long PERF_EVENT_IOC_SET_FILTER


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)


cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    void *MAP_FAILED
    enum:
        PROT_READ
        PROT_WRITE
        MAP_SHARED


cdef extern from "<sys/epoll.h>" nogil:
    union epoll_data_t:
        int fd
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    enum:
        EPOLLIN
        EPOLL_CTL_ADD
        EPOLL_CLOEXEC

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)


cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK
    int eventfd(unsigned int initval, int flags)


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    enum:
        CLOCK_MONOTONIC
    int clock_gettime(int clk_id, timespec *tp)


cdef inline uint64_t monotonic_ns() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return <uint64_t>t.tv_sec * 1000000000ULL + <uint64_t>t.tv_nsec


cdef extern from "mace_debug.h" nogil:
    # 1 in a MACE_DEBUG build.  MACE_ASSERT(cond, what) aborts naming `what` when `cond` is
    # false in a debug build, and is compiled away otherwise.
    const int MACE_DEBUG_ON
    void MACE_ASSERT(bint cond, const char *what)
