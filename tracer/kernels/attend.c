/* One decode token's attention over the KV cache, for batch-1 decode on x86-64 CPUs.
 *
 * Why this exists: the compiled decode step attends over every slot of a fixed-size cache (the
 * unwritten ones masked), so that its shapes never change; the code torch.compile generates for
 * that reads and scores every slot, written or not, and widens each 16-bit key once per query
 * head. Here only the rows up to the token's own position are read, and each KV head's rows come
 * from memory once: they stay in the L1/L2 cache while the n_rep query heads that share them (GQA)
 * use them. The math is softmax(q . k * scale) . v with float32 scores, softmax and sums, rounded
 * once at the end, as tracer/model.py's _masked_decode_attention does.
 *
 * Layouts (row-major, batch 1): q and z are [Hkv, n_rep, hd]; K and V are [Hkv, *, hd] with
 * head_stride elements between KV heads. Built into the same library as matvec.c.
 */
#include <math.h>

#include "widen.h"

/* Limits the caller checks (tracer/attend.py): hd a multiple of 8 up to 256, n_rep up to 16
 * (the query rows are widened once, into a buffer on the stack). */
#define MAX_HD 256
#define MAX_REP 16

/* Returns 0, or -1 if a scratch buffer could not be allocated, or -2 if *position is outside
 * [0, S). Attends to keys 0..*position (the position is read here, so the caller never
 * synchronises on it). Heads are split over OpenMP threads when there is enough work. */
#define ATTEND(NAME, T)                                                                         \
    int attend_##NAME(const T *q, const T *K, const T *V, T *z, const int64_t *position,       \
                      long Hkv, long n_rep, long hd, long S, long head_stride, float scale,    \
                      int threads) {                                                            \
        long pos = *position;                                                                   \
        if (pos < 0 || pos >= S) return -2;                                                     \
        long n = pos + 1;                                                                       \
        int team = (Hkv * n_rep * n * hd >= 65536 && threads > 1) ? threads : 1, failed = 0;    \
        _Pragma("omp parallel for num_threads(team) schedule(static)")                          \
        for (long g = 0; g < Hkv; g++) {                                                        \
            float *s = malloc(sizeof(float) * (size_t)(n_rep * n));                             \
            if (!s) {                                                                           \
                _Pragma("omp atomic write")                                                     \
                failed = 1;                                                                     \
                continue;                                                                       \
            }                                                                                   \
            float qf[MAX_REP][MAX_HD];                                                          \
            for (long r = 0; r < n_rep; r++)                                                    \
                for (long c = 0; c < hd; c += 8)                                                \
                    _mm256_storeu_ps(qf[r] + c, load8_##NAME(q + (g * n_rep + r) * hd + c));  \
            /* Scores, a query row at a time: that row and two accumulators stay in registers,    \
             * and the head's keys (a few kB per hundred slots) stay in the L1/L2 cache. */       \
            const T *Kg = K + g * head_stride, *Vg = V + g * head_stride;                       \
            for (long r = 0; r < n_rep; r++) {                                                  \
                const float *qr = qf[r];                                                        \
                float *sr = s + r * n;                                                          \
                for (long j = 0; j < n; j++) {                                                  \
                    const T *kj = Kg + j * hd;                                                  \
                    __m256 a0 = _mm256_mul_ps(load8_##NAME(kj), _mm256_loadu_ps(qr));         \
                    __m256 a1 = _mm256_setzero_ps();                                            \
                    for (long c = 8; c + 8 <= hd; c += 16) {                                    \
                        a1 = _mm256_fmadd_ps(load8_##NAME(kj + c), _mm256_loadu_ps(qr + c), a1); \
                        if (c + 16 <= hd)                                                       \
                            a0 = _mm256_fmadd_ps(load8_##NAME(kj + c + 8), _mm256_loadu_ps(qr + c + 8), a0); \
                    }                                                                           \
                    sr[j] = hsum(_mm256_add_ps(a0, a1)) * scale;                              \
                }                                                                               \
            }                                                                                   \
            /* Softmax per query row, in float32, shifted by the row's maximum. */              \
            for (long r = 0; r < n_rep; r++) {                                                  \
                float *sr = s + r * n, m = sr[0], sum = 0.0f;                                   \
                for (long j = 1; j < n; j++) m = sr[j] > m ? sr[j] : m;                         \
                for (long j = 0; j < n; j++) { sr[j] = expf(sr[j] - m); sum += sr[j]; }         \
                for (long j = 0; j < n; j++) sr[j] /= sum;                                      \
            }                                                                                   \
            /* Weighted sum of values, a query row and 32 columns at a time, the sums in        \
             * registers; the head's values stay in the L1/L2 cache between rows. */             \
            for (long r = 0; r < n_rep; r++) {                                                  \
                const float *pr = s + r * n;                                                    \
                T *zr = z + (g * n_rep + r) * hd;                                               \
                for (long c = 0; c < hd; c += 32) {                                             \
                    long w = hd - c < 32 ? hd - c : 32; /* 8, 16, 24 or 32 columns */           \
                    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                 \
                    for (long j = 0; j < n; j++) {                                              \
                        const T *vj = Vg + j * hd + c;                                          \
                        __m256 p = _mm256_set1_ps(pr[j]);                                       \
                        a0 = _mm256_fmadd_ps(p, load8_##NAME(vj), a0);                        \
                        if (w > 8) a1 = _mm256_fmadd_ps(p, load8_##NAME(vj + 8), a1);         \
                        if (w > 16) a2 = _mm256_fmadd_ps(p, load8_##NAME(vj + 16), a2);       \
                        if (w > 24) a3 = _mm256_fmadd_ps(p, load8_##NAME(vj + 24), a3);       \
                    }                                                                           \
                    store8_##NAME(zr + c, a0);                                                \
                    if (w > 8) store8_##NAME(zr + c + 8, a1);                                 \
                    if (w > 16) store8_##NAME(zr + c + 16, a2);                               \
                    if (w > 24) store8_##NAME(zr + c + 24, a3);                               \
                }                                                                               \
            }                                                                                   \
            free(s);                                                                            \
        }                                                                                       \
        return failed ? -1 : 0;                                                                 \
    }

ATTEND(f32, float)
ATTEND(f16, uint16_t)
ATTEND(bf16, uint16_t)
