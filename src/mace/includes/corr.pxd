# The correlator's records (includes/mace_corr.h): its table entry and the packed report
# that the formatter and every consumer of reports read.

from libc.stdint cimport int16_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "mace_corr.h" nogil:
    enum:
        MACE_HOPS

    ctypedef struct mace_entry:
        uint64_t skb
        uint64_t t0
        uint32_t hop[6]
        uint32_t tlast
        uint32_t l3
        uint32_t tid
        int16_t container
        int16_t start_dev
        uint16_t cpu
        uint16_t proto
        uint8_t dir
        uint8_t step
        uint8_t flags
        uint8_t ctx

    ctypedef struct mace_report:
        uint64_t t0
        uint64_t seq
        uint32_t latency
        uint32_t len
        uint16_t container
        uint8_t dir
        uint8_t nhops
        uint16_t cpu
        uint32_t hop[6]
