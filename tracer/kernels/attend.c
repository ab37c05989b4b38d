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
#include "widen.h"

/* Limits the caller checks (tracer/attend.py's fits): hd a multiple of HD_STEP (eight-lane loads)
 * up to MAX_HD, n_rep up to MAX_REP (the query rows are widened once, into a buffer on the stack). */
#define MAX_HD 256
#define HD_STEP 8
#define MAX_REP 16

/* The limits above, exported so that Python reads them here instead of repeating the numbers
 * (tracer/kernels/library.py). */
void attend_limits(long *max_hd, long *hd_step, long *max_rep) {
    *max_hd = MAX_HD;
    *hd_step = HD_STEP;
    *max_rep = MAX_REP;
}

/* e^x for eight float32 lanes, as Cephes' expf computes it: x = n ln2 + r with |r| <= ln2 / 2,
 * e^r from a polynomial, 2^n put straight into the exponent bits. Within 1 ulp of glibc's expf
 * over the range used here, x <= 0 (checked for every float in [-1, 0] and every 64th below).
 * Below -87.3, where e^x is under float32's smallest normal number, it returns about 1e-38
 * instead of a denormal or 0, which no softmax sum can notice. A NaN stays NaN. The scalar expf
 * took most of the kernel's time for a few hundred keys. */
static inline __m256 exp8(__m256 x) {
    /* min/max return their second operand when one is NaN: x goes second, so NaN passes through. */
    x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);
    x = _mm256_max_ps(_mm256_set1_ps(-87.3365478515625f), x);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* r = x - n ln2, with ln2 split in two so that n * ln2_hi is exact. */
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* softmax in place over one query row's n float32 scores, shifted by the row's maximum. */
static void softmax(float *s, long n) {
    float m = s[0];
    for (long j = 1; j < n; j++) m = s[j] > m ? s[j] : m;
    __m256 mv = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
    long j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum(acc);
    if (j < n) { /* the last n % 8 scores: the unused lanes hold 0 and are not written back */
        float t[8] = {0};
        for (long i = 0; i < n - j; i++) t[i] = s[j + i] - m;
        _mm256_storeu_ps(t, exp8(_mm256_loadu_ps(t)));
        for (long i = 0; i < n - j; i++) { s[j + i] = t[i]; sum += t[i]; }
    }
    /* Divided by the sum, not multiplied by its inverse, as torch.compile's softmax (the one this
     * kernel replaces in the compiled step) does. */
    __m256 total = _mm256_set1_ps(sum);
    for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(s + j, _mm256_div_ps(_mm256_loadu_ps(s + j), total));
    for (; j < n; j++) s[j] /= sum;
}

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
            for (long r = 0; r < n_rep; r++) softmax(s + r * n, n);                              \
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
