/* Invariant checks for debug builds (MACE_DEBUG=1 python setup.py build_ext / pip install).
 *
 * The hot loops run without the GIL and without bounds checks: an invariant that breaks
 * there corrupts memory silently.  A debug build stops at the first broken invariant, with
 * where and what; a release build compiles the checks away. */
#ifndef MACE_DEBUG_H
#define MACE_DEBUG_H

#ifdef MACE_DEBUG
#include <stdio.h>
#include <stdlib.h>

#define MACE_DEBUG_ON 1

/* abort() rather than an exception: the checks sit in nogil code that cannot raise, and a
 * core dump at the fault is what one wants from a debug build. */
static inline void mace_assert_fail(const char *what, const char *file, int line) {
    fprintf(stderr, "mace: invariant violated: %s (%s:%d)\n", what, file, line);
    fflush(stderr);
    abort();
}
#define MACE_ASSERT(cond, what) ((cond) ? (void)0 : mace_assert_fail((what), __FILE__, __LINE__))
#else
#define MACE_DEBUG_ON 0
#define MACE_ASSERT(cond, what) ((void)0)
#endif

#endif
