/* The preamble every multi-threaded fused kernel repeats (one_token_impl.h, channel_mix_impl.h): how many threads
 * its one OpenMP region asks for, and, inside the region, this thread's index and the team's size.
 *
 *     const int nthreads = wuneng_team_size(threads);
 *     #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
 *     {
 *         WUNENG_THREAD_INDEX(t, T);   // const int t (0 .. T - 1), T (the threads that joined)
 *         ...
 *     }
 *
 * Without OpenMP (no -fopenmp) the pragma is ignored and every kernel runs as thread 0 of a team of 1. */
#ifndef WUNENG_PARALLEL_H
#define WUNENG_PARALLEL_H

#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#define WUNENG_THREAD_INDEX(t, T) const int t = omp_get_thread_num(), T = omp_get_num_threads()
#else
#define WUNENG_THREAD_INDEX(t, T) const int t = 0, T = 1
#endif

/* the threads a kernel's region asks for: its `threads` argument, at least 1 */
static inline int wuneng_team_size(int64_t threads)
{
    return threads > 1 ? (int)threads : 1;
}

#endif
