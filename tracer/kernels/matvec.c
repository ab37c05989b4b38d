/* One-row matrix-vector products y[n] = sum_k W[n, k] * x[k] for batch-1 decode on x86-64 CPUs
 * (matvec_*), and the same for a few rows at once, a short prompt (matmat_*, further down).
 *
 * Why this exists: decoding one token reads every weight once, so its speed limit is memory
 * bandwidth. On AVX2 CPUs torch's float16/bfloat16 one-row product reads weights at about two
 * thirds of the machine's read rate, and its float32 one has a large fixed cost per call. This loop
 * is the textbook kernel: four rows at a time, each from its own long sequential read stream
 * (see below), eight lanes per step, 16-bit weights widened to float32 in registers, and float32
 * accumulation, rounded once at the end as torch does. Rows are split over OpenMP threads
 * (the same runtime torch uses, so the thread count is torch's).
 *
 * Built at first use by tracer/kernels/build.py with -mavx2 -mfma -mf16c; plain C with
 * intrinsics, no torch headers. Every function takes raw pointers to contiguous row-major data.
 */
#include "widen.h"

/* x arrives in the storage type; each thread widens its own float32 copy once per call.
 *
 * Which rows are summed together matters more than anything else here. Each step of the loop
 * below takes rows g, g + G, g + 2G and g + 3G (G = N / 4), so as g advances each of the four
 * read streams runs through a contiguous quarter of the matrix, and each thread's share is four
 * long sequential runs. The hardware prefetchers keep such streams far ahead; with a group of
 * adjacent rows instead (a row of a 2048-wide float16 matrix is 4 kB, a page's worth), each stream
 * lasts a page or so before all of them jump at once. On the 2-core CI VM, one pass over every
 * Llama-3.2-1B weight (median of 16 alternating rounds) took 72 ms this way, 103 ms with four
 * adjacent rows and 95 with eight. Each row's sum is the same either way. The last N % 4 rows,
 * and the last K % 8 columns of every row, take the same path one element at a time. Small
 * products stay on one thread: starting the team costs more than they take. */
#define STREAMS 4
/* Several matrices of one input (q, k and v; gate and up) are one call: part p has Ns[p] rows at
 * Ws[p], and its results follow the previous part's in y. One call starts one thread team and
 * widens x once for all of them, and no matrix has to be copied next to another first (a hub
 * checkpoint stores q, k and v apart, and the loader maps weights rather than copying them).
 * Exported as matvec_* (one matrix) and matvec3_* (up to MAX_PARTS; a part of 0 rows is skipped),
 * with plain arguments: a Python caller building arrays would spend a few microseconds, as much
 * as a small model's product takes. */
#define MAX_PARTS 3
#define MATVEC(NAME, T)                                                                         \
    static void matvec_parts_##NAME(const T *const *Ws, const long *Ns, int parts,              \
                                    const T *x_in, T *y, long K, int threads) {                 \
        long total = 0;                                                                         \
        for (int p = 0; p < parts; p++) total += Ns[p];                                         \
        int team = (total * K >= 65536 && threads > 1) ? threads : 1;                         \
        _Pragma("omp parallel num_threads(team)")                                               \
        {                                                                                       \
            float x[K];                                                                         \
            for (long k = 0; k < K; k++) x[k] = one_##NAME(x_in + k);                           \
            long K8 = K & ~7L;                                                                  \
            T *yp = y;                                                                          \
            for (int p = 0; p < parts; p++) {                                                   \
                const T *W = Ws[p];                                                             \
                long N = Ns[p], G = N / STREAMS;                                                \
                _Pragma("omp for schedule(static) nowait")                                      \
                for (long g = 0; g < G; g++) {                                                  \
                    const T *r = W + g * K; /* stream i reads row g + i * G, at r + i * G * K */ \
                    __m256 a[STREAMS];                                                          \
                    for (int i = 0; i < STREAMS; i++) a[i] = _mm256_setzero_ps();               \
                    for (long k = 0; k < K8; k += 8) {                                          \
                        __m256 xv = _mm256_loadu_ps(x + k);                                     \
                        for (int i = 0; i < STREAMS; i++)                                       \
                            a[i] = _mm256_fmadd_ps(load8_##NAME(r + i * G * K + k), xv, a[i]);  \
                    }                                                                           \
                    for (int i = 0; i < STREAMS; i++) {                                         \
                        float s = hsum(a[i]);                                                   \
                        for (long k = K8; k < K; k++) s += one_##NAME(r + i * G * K + k) * x[k]; \
                        store_##NAME(yp + g + i * G, s);                                        \
                    }                                                                           \
                }                                                                               \
                _Pragma("omp for schedule(static) nowait")                                      \
                for (long n = STREAMS * G; n < N; n++) {                                        \
                    const T *r = W + n * K;                                                     \
                    __m256 a = _mm256_setzero_ps();                                             \
                    for (long k = 0; k < K8; k += 8)                                            \
                        a = _mm256_fmadd_ps(load8_##NAME(r + k), _mm256_loadu_ps(x + k), a);     \
                    float s = hsum(a);                                                          \
                    for (long k = K8; k < K; k++) s += one_##NAME(r + k) * x[k];                \
                    store_##NAME(yp + n, s);                                                    \
                }                                                                               \
                yp += N;                                                                        \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    void matvec_##NAME(const T *W, const T *x_in, T *y, long N, long K, int threads) {          \
        matvec_parts_##NAME(&W, &N, 1, x_in, y, K, threads);                                    \
    }                                                                                           \
    void matvec3_##NAME(const T *W0, long N0, const T *W1, long N1, const T *W2, long N2,       \
                        const T *x_in, T *y, long K, int threads) {                             \
        const T *Ws[MAX_PARTS] = {W0, W1, W2};                                                  \
        long Ns[MAX_PARTS] = {N0, N1, N2};                                                      \
        matvec_parts_##NAME(Ws, Ns, MAX_PARTS, x_in, y, K, threads);                            \
    }

/* How many matrices one matvec3_* call takes (its W0..W2 arguments), exported so that Python
 * reads it here (tracer/kernels/library.py). */
long matvec_max_parts(void) { return MAX_PARTS; }

MATVEC(f32, float)
MATVEC(f16, uint16_t)
MATVEC(bf16, uint16_t)

/* A few rows at once (a short prompt, T <= 64): Y[t, n] = sum_k W[n, k] * X[t, k] for 16-bit
 * weights. torch's float16 matmul on AVX2 CPUs handles each of the T rows as a separate pass over
 * the weights; here each group of four weight rows is widened to float32 once, into a buffer that
 * stays in the L1/L2 cache, and then serves all T rows of X, two at a time (eight accumulators).
 * Sums are float32 in the same order for every row, rounded once, as in matvec above. */
#define MATMAT(NAME, T_)                                                                        \
    int matmat_##NAME(const T_ *W, const T_ *X_in, T_ *Y, long N, long K, long T, int threads) { \
        int team = threads > 1 ? threads : 1, failed = 0;                                       \
        _Pragma("omp parallel num_threads(team)")                                               \
        {                                                                                       \
            float *x = malloc(sizeof(float) * (size_t)(T * K + 4 * K));                         \
            if (!x) {                                                                           \
                _Pragma("omp atomic write")                                                     \
                failed = 1;                                                                     \
            }                                                                                   \
            _Pragma("omp barrier")                                                              \
            if (!failed) {                                                                      \
                float *w = x + T * K;                                                           \
                for (long i = 0; i < T * K; i++) x[i] = one_##NAME(X_in + i);                   \
                long K8 = K & ~7L, groups = (N + 3) / 4;                                        \
                _Pragma("omp for schedule(static)")                                             \
                for (long g = 0; g < groups; g++) {                                             \
                    long n0 = g * 4, rows = N - n0 < 4 ? N - n0 : 4;                            \
                    for (long r = 0; r < rows; r++) {                                           \
                        const T_ *src = W + (n0 + r) * K;                                       \
                        for (long k = 0; k < K8; k += 8) _mm256_storeu_ps(w + r * K + k, load8_##NAME(src + k)); \
                        for (long k = K8; k < K; k++) w[r * K + k] = one_##NAME(src + k);       \
                    }                                                                           \
                    for (long r = rows; r < 4; r++) memset(w + r * K, 0, sizeof(float) * K);     \
                    for (long t = 0; t < T; t += 2) {                                           \
                        const float *x0 = x + t * K, *x1 = t + 1 < T ? x0 + K : x0;             \
                        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;      \
                        __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;                      \
                        for (long k = 0; k < K8; k += 8) {                                      \
                            __m256 u = _mm256_loadu_ps(x0 + k), v = _mm256_loadu_ps(x1 + k);     \
                            __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + K + k); \
                            __m256 w2 = _mm256_loadu_ps(w + 2 * K + k), w3 = _mm256_loadu_ps(w + 3 * K + k); \
                            a00 = _mm256_fmadd_ps(w0, u, a00); a10 = _mm256_fmadd_ps(w0, v, a10); \
                            a01 = _mm256_fmadd_ps(w1, u, a01); a11 = _mm256_fmadd_ps(w1, v, a11); \
                            a02 = _mm256_fmadd_ps(w2, u, a02); a12 = _mm256_fmadd_ps(w2, v, a12); \
                            a03 = _mm256_fmadd_ps(w3, u, a03); a13 = _mm256_fmadd_ps(w3, v, a13); \
                        }                                                                       \
                        float s[2][4] = {{hsum(a00), hsum(a01), hsum(a02), hsum(a03)},          \
                                         {hsum(a10), hsum(a11), hsum(a12), hsum(a13)}};         \
                        for (long k = K8; k < K; k++)                                           \
                            for (int r = 0; r < 4; r++) {                                       \
                                s[0][r] += w[r * K + k] * x0[k];                                \
                                s[1][r] += w[r * K + k] * x1[k];                                \
                            }                                                                   \
                        for (long r = 0; r < rows; r++) {                                       \
                            store_##NAME(Y + t * N + n0 + r, s[0][r]);                          \
                            if (t + 1 < T) store_##NAME(Y + (t + 1) * N + n0 + r, s[1][r]);     \
                        }                                                                       \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
            free(x);                                                                            \
        }                                                                                       \
        return failed ? -1 : 0;                                                                 \
    }

MATMAT(f16, uint16_t)
MATMAT(bf16, uint16_t)
