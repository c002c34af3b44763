/* C side of the perf ring protocol and the compact records the hot loop produces.
 * Kept apart from the Cython logic so the ABI can be read in one place. */
#ifndef MACE_ABI_H
#define MACE_ABI_H

#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/perf_event.h>

/* One decoded tracepoint sample: 32 bytes, so a cache line holds two. */
typedef struct mace_event {
    uint64_t ts;     /* CLOCK_MONOTONIC, ns */
    uint64_t skb;    /* skbaddr field, the correlation key */
    uint32_t len;    /* len field (send side includes the Ethernet header) */
    uint32_t tid;    /* thread that was running when the event fired */
    uint16_t cpu;
    uint8_t  kind;   /* index of the tracepoint in the capture's list */
    uint8_t  flags;  /* common_flags: irq/softirq context of the event */
    int16_t  dev;    /* device slot, or MACE_DEV_NONE / MACE_DEV_OTHER */
    uint16_t proto;  /* protocol field (host order) when the event has one, else 0 */
} mace_event;

#define MACE_DEV_NONE  (-1)  /* the event carries no device name (skb:consume_skb) */
#define MACE_DEV_OTHER (-2)  /* a name that is not in the capture's device list */

/* perf writes the control page fields from another CPU: the head must be read with acquire
 * semantics before the records it covers, and the tail stored with release semantics after
 * we are done reading them (include/uapi/linux/perf_event.h, "data_head"). */
static inline uint64_t mace_load_acquire(const __u64 *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline void mace_store_release(__u64 *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

/* glibc has no wrapper for perf_event_open. */
static inline int mace_perf_event_open(struct perf_event_attr *attr, int pid, int cpu,
                                       int group_fd, unsigned long flags) {
    return (int)syscall(SYS_perf_event_open, attr, pid, cpu, group_fd, flags);
}

/* Fields inside a raw tracepoint record sit at any byte offset (the raw block starts at
 * offset 36 of the sample), so every load goes through memcpy. */
static inline uint64_t mace_load_u64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t mace_load_u32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint16_t mace_load_u16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }

#endif
