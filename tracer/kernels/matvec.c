/* One-row matrix-vector products y[n] = sum_k W[n, k] * x[k] for batch-1 decode on x86-64 CPUs.
 *
 * Why this exists: decoding one token reads every weight once, so its speed limit is memory
 * bandwidth. On AVX2 CPUs torch's float16/bfloat16 one-row product reads weights at about two
 * thirds of the machine's read rate, and its float32 one has a large fixed cost per call. This loop
 * is the textbook kernel: four rows at a time (four independent read streams the hardware
 * prefetcher follows), eight lanes per step, 16-bit weights widened to float32 in registers, and
 * float32 accumulation, rounded once at the end as torch does. Rows are split over OpenMP threads
 * (the same runtime torch uses, so the thread count is torch's).
 *
 * Built at first use by tracer/matvec.py with -mavx2 -mfma -mf16c; plain C with intrinsics, no
 * torch headers. Every function takes raw pointers to contiguous row-major data.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* 8 weights of each storage type, widened to float32. */
static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_f16(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
static inline __m256 load8_bf16(const uint16_t *p) {
    /* bfloat16 is the top half of a float32: widen to 32 bits and shift left by 16. */
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline float one_f32(const float *p) { return *p; }
static inline float one_f16(const uint16_t *p) { return _cvtsh_ss(*p); }
static inline float one_bf16(const uint16_t *p) {
    uint32_t bits = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Rounding the float32 sums to the storage type, as torch rounds (nearest, ties to even). */
static inline void store_f32(float *y, float v) { *y = v; }
static inline void store_f16(uint16_t *y, float v) { *y = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); }
static inline void store_bf16(uint16_t *y, float v) {
    uint32_t bits;
    memcpy(&bits, &v, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) { *y = (uint16_t)((bits >> 16) | 0x40); return; } /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    *y = (uint16_t)(bits >> 16);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* x arrives in the storage type; each thread widens its own float32 copy once per call. Rows are
 * processed in groups of four; a remainder of fewer than four rows and of fewer than eight columns
 * takes the same path one element at a time. Small products stay on one thread: starting the
 * team costs more than they take. */
#define MATVEC(NAME, T)                                                                         \
    void matvec_##NAME(const T *W, const T *x_in, T *y, long N, long K, int threads) {          \
        int team = (N * K >= 65536 && threads > 1) ? threads : 1;                             \
        _Pragma("omp parallel num_threads(team)")                                               \
        {                                                                                       \
            float x[K];                                                                         \
            for (long k = 0; k < K; k++) x[k] = one_##NAME(x_in + k);                           \
            long K8 = K & ~7L, groups = (N + 3) / 4;                                            \
            _Pragma("omp for schedule(static)")                                                 \
            for (long g = 0; g < groups; g++) {                                                 \
                long n0 = g * 4, rows = N - n0 < 4 ? N - n0 : 4;                                \
                if (rows == 4) {                                                                \
                    const T *r0 = W + n0 * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;         \
                    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                 \
                    for (long k = 0; k < K8; k += 8) {                                          \
                        __m256 xv = _mm256_loadu_ps(x + k);                                     \
                        a0 = _mm256_fmadd_ps(load8_##NAME(r0 + k), xv, a0);                     \
                        a1 = _mm256_fmadd_ps(load8_##NAME(r1 + k), xv, a1);                     \
                        a2 = _mm256_fmadd_ps(load8_##NAME(r2 + k), xv, a2);                     \
                        a3 = _mm256_fmadd_ps(load8_##NAME(r3 + k), xv, a3);                     \
                    }                                                                           \
                    float s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};                      \
                    for (long k = K8; k < K; k++) {                                             \
                        s[0] += one_##NAME(r0 + k) * x[k];                                      \
                        s[1] += one_##NAME(r1 + k) * x[k];                                      \
                        s[2] += one_##NAME(r2 + k) * x[k];                                      \
                        s[3] += one_##NAME(r3 + k) * x[k];                                      \
                    }                                                                           \
                    for (int i = 0; i < 4; i++) store_##NAME(y + n0 + i, s[i]);                 \
                } else {                                                                        \
                    for (long n = n0; n < n0 + rows; n++) {                                     \
                        const T *r = W + n * K;                                                 \
                        __m256 a = _mm256_setzero_ps();                                         \
                        for (long k = 0; k < K8; k += 8)                                        \
                            a = _mm256_fmadd_ps(load8_##NAME(r + k), _mm256_loadu_ps(x + k), a); \
                        float s = hsum(a);                                                      \
                        for (long k = K8; k < K; k++) s += one_##NAME(r + k) * x[k];            \
                        store_##NAME(y + n, s);                                                 \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }

MATVEC(f32, float)
MATVEC(f16, uint16_t)
MATVEC(bf16, uint16_t)
