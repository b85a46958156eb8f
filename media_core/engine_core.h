/* Small C helpers for the media engine that Cython cannot spell directly: gettid, the
 * monotonic clock in nanoseconds, atomic flags shared between the control and engine threads,
 * random numbers for SSRC / initial sequence numbers (RFC 3550 section 5.1), and a prefetch
 * hint. */
#ifndef EDGECC_ENGINE_CORE_H
#define EDGECC_ENGINE_CORE_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <sys/random.h>

static inline int engine_gettid(void) { return (int)syscall(SYS_gettid); }

static inline int64_t engine_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Sleeps until the CLOCK_MONOTONIC time t (ns): the engine's receive coalescing window. */
static inline void engine_sleep_until_ns(int64_t t)
{
    struct timespec ts = {.tv_sec = t / 1000000000LL, .tv_nsec = t % 1000000000LL};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) != 0) {
    }
}

static inline void engine_store_flag(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline int engine_load_flag(int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

/* Recordings' ring lines were written a window (~100 ms) ago: the tick asks for them ahead. */
static inline void engine_prefetch(const void *p) { __builtin_prefetch(p, 1, 3); }

static inline uint32_t engine_random32(void)
{
    uint32_t v = 0;
    if (getrandom(&v, sizeof v, GRND_NONBLOCK) != (ssize_t)sizeof v)
        v = (uint32_t)engine_now_ns() * 2654435761u;
    return v;
}

#endif
