/* Records of the correlator: table entries (one per packet in flight) and reports (one per
 * packet per direction that crossed the measured segment). */
#ifndef MACE_CORR_H
#define MACE_CORR_H

#include <stddef.h>
#include <stdint.h>

#define MACE_HOPS 6    /* intermediate timestamps a report carries (egress uses 5, ingress 4) */

/* 64 bytes: one cache line per packet in flight. */
typedef struct mace_entry {
    uint64_t skb;             /* key; 0 marks an empty slot */
    uint64_t t0;              /* timestamp of the start event */
    uint32_t hop[MACE_HOPS];  /* ns after t0 of each intermediate step, 0 = not seen */
    uint32_t tlast;           /* ns after t0 of the last matched event */
    uint32_t l3;              /* length without the Ethernet header */
    uint32_t tid;             /* thread of the last matched event (synchronous steps); in a
                                 socket's queue (the socket segment), its place there */
    int16_t container;        /* -1 until the packet crossed a monitored veth */
    int16_t start_dev;        /* device slot of the start event */
    uint16_t cpu;             /* CPU of the last matched event */
    uint16_t proto;           /* ethertype seen at the start (0 when the event has none) */
    uint8_t dir;              /* 0 egress, 1 ingress */
    uint8_t step;             /* last matched step of that direction's path */
    uint8_t flags;
    uint8_t ctx;              /* hardirq/softirq/NMI bits of the last matched event */
} mace_entry;
_Static_assert(sizeof(mace_entry) == 64, "a table entry is one cache line");

/* 56 bytes, every field naturally aligned: the layout is REPORT_FORMAT, shared with Python
 * (mace.output.report) and with saved service state.  seq is 64 bits: at a million
 * packets a second a 32-bit counter wraps in 72 minutes, and a reader takes a wrap for
 * lost reports. */
typedef struct mace_report {
    uint64_t t0;              /* CLOCK_MONOTONIC ns when the packet entered the segment */
    uint64_t seq;             /* per container and direction, from 1 */
    uint32_t latency;         /* ns spent in the segment */
    uint32_t len;             /* length without the Ethernet header */
    uint16_t container;
    uint8_t dir;
    uint8_t nhops;
    uint16_t cpu;             /* CPU of the end event */
    uint16_t pad;
    uint32_t hop[MACE_HOPS];  /* as in mace_entry */
} mace_report;
_Static_assert(sizeof(mace_report) == 56, "report layout is part of the Python API");
_Static_assert(offsetof(mace_report, seq) == 8 && offsetof(mace_report, container) == 24
               && offsetof(mace_report, hop) == 32, "REPORT_FORMAT offsets");

#endif
