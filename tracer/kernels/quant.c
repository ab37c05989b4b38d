/* One-row products y[n] = sum_k W[n, k] * x[k] (batch-1 decode) straight from GGUF's quantized
 * blocks, and rows of such a matrix dequantized to float32 (a prompt's tiles), on x86-64 CPUs.
 *
 * Why this exists: decoding one token reads every weight once, so its speed limit is memory
 * bandwidth, and a quantized weight is 4 to 8.5 bits instead of 16 (tracer/matvec.py). Here the
 * bytes stay as the file has them: each block is decoded into registers (codes widened to float32
 * lanes), multiplied by the float32 activations and summed in float32, four rows at a time from
 * four long read streams, as matvec.c reads float16 rows. Activations stay float32, so nothing
 * downstream (hooks, traces) sees a difference beyond float32 summation order.
 *
 * Block formats (ggml's, llama.cpp ggml/src/ggml-common.h; gguf-py's gguf/quants.py decodes the
 * same), each a run of `bytes` bytes standing for `block` consecutive weights of one row:
 *   Q8_0  34 B / 32:  fp16 d, 32 int8 q                      w = d * q
 *   Q4_0  18 B / 32:  fp16 d, 16 B of 4-bit q                w = d * (q - 8)
 *   Q4_1  20 B / 32:  fp16 d, fp16 m, 16 B of 4-bit q        w = d * q + m
 *   Q4_K 144 B / 256: fp16 d, fp16 dmin, 12 B of 6-bit scales and mins for 8 sub-blocks of 32,
 *                     128 B of 4-bit q                        w = d * sc[j] * q - dmin * m[j]
 *   Q6_K 210 B / 256: 128 B low 4 bits, 64 B high 2 bits, 16 int8 scales (one per 16 weights),
 *                     fp16 d                                  w = d * sc[j] * (q - 32)
 * In the 4-bit formats byte i of a 32-weight run holds weight i (low nibble) and weight i + 16
 * (high nibble); Q4_K's 128 code bytes are four such runs of 64 weights (32 bytes each).
 *
 * Offsets and minimums are not applied per weight in the products: sum_i (d q_i + m) x_i is
 * d * sum_i q_i x_i + m * sum_i x_i, and the sums of x over each run of 32 weights (16 for Q6_K)
 * are computed once per call, shared by every row. Dequantizing (quant_dequantize) computes each weight exactly as
 * gguf-py does, in the same float32 operations and order, so its output equals gguf's bit for bit.
 * (Whether the compiler fuses d * q + m into one FMA does not matter: a float16 scale times a code
 * of at most 8 bits, or Q4_K's d * sc * q, is exact in float32, so only the sum rounds.)
 *
 * On one core these loops are limited by the vector ports, not by memory: each 8 or 16 codes take
 * a widening, a conversion to float and a multiply-add, and a block's scales take more. So scales
 * come from memory as broadcast loads (HALF below, small arrays on the stack), never through
 * register shuffles, and AVX-512 looks 4-bit codes up as floats with one permute.
 *
 * Three paths: AVX2+FMA+F16C intrinsics (the library is built with -mavx2 -mfma -mf16c), AVX-512F
 * (compiled for it function by function, taken where the CPU has it: twice the lanes per
 * instruction), and plain C (no intrinsics) that any CPU runs. The caller can force each (the
 * tests compare them). Built by tracer/kernels/build.py into a library of its own, apart from
 * matvec.c and attend.c (a compiler that cannot build this file leaves those working).
 */
#include "widen.h"

/* ggml's type ids (gguf.GGMLQuantizationType), the five formats this file decodes. */
enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q6_K = 14 };
#define MAX_BLOCK 256 /* weights in the largest block (the K formats' super-block) */
#define MIN_SPAN 16   /* x is summed over runs of a format's SPAN weights: 16 (Q6_K's scales) or 32 */
#define STREAMS 4     /* rows read at once, each from its own quarter of the matrix (see matvec.c) */

/* ---- Shared pieces ------------------------------------------------------------------------ */

/* float16 -> float32 for every bit pattern, filled once as the library loads (F16C: the library
 * is only built for AVX2 CPUs, which all have it). A block's scale then reaches all lanes as one
 * broadcast load from this table and no vector ALU work: converting it in registers (insert, F16C
 * convert, broadcast) cost 3 to 4 of the dozen vector micro-ops a 32-weight block takes (on one
 * core, Q8_0 and Q4_0 ran 1.4x faster with the table). 256 kB, of which a model's scales touch a
 * few kB (they span a few binades). */
static float HALF[1 << 16];
__attribute__((constructor)) static void fill_half(void) {
    for (uint32_t h = 0; h < 1 << 16; h++) HALF[h] = _cvtsh_ss((uint16_t)h);
}

static inline float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return HALF[h];
}

/* Q4_K packs 6-bit scales and mins for 8 sub-blocks in 12 bytes: bytes 0-3 hold scales 0-3 and
 * bytes 4-7 mins 0-3 in their low 6 bits; scales and mins 4-7 take their low 4 bits from bytes
 * 8-11 and their top 2 bits from the spare top bits of bytes 0-7 (llama.cpp's get_scale_min_k4). */
static inline void q4_K_scales(const uint8_t *s, uint8_t sc[8], uint8_t m[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

/* 8 bytes widened to 8 int32 lanes (zero- or sign-extended), and int32 lanes as float32. */
static inline __m256i u8x8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline __m256i s8x8(const uint8_t *p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline __m256 flt(__m256i v) { return _mm256_cvtepi32_ps(v); }
static inline __m256i low4(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi32(15)); }
static inline __m256i high4(__m256i v) { return _mm256_srli_epi32(v, 4); } /* lanes hold one byte */
static inline __m256 xat(const float *x) { return _mm256_loadu_ps(x); }
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)

/* The same 12 bytes unpacked four at a time (llama.cpp's kmask trick, for the products): out
 * bytes 0-7 are the scales, 8-15 the mins. */
static inline void q4_K_unpack(const uint8_t *s, uint8_t out[16]) {
    const uint32_t m6 = 0x3f3f3f3f, m4 = 0x0f0f0f0f, m2 = 0x03030303;
    uint32_t u[4];
    memcpy(u, s, 12);
    u[3] = ((u[2] >> 4) & m4) | (((u[1] >> 6) & m2) << 4); /* mins 4-7 */
    uint32_t mins = u[1] & m6;                            /* mins 0-3 */
    u[1] = (u[2] & m4) | (((u[0] >> 6) & m2) << 4);        /* scales 4-7 */
    u[2] = mins;
    u[0] &= m6; /* scales 0-3 */
    memcpy(out, u, 16);
}

/* ---- AVX2 products: one block of one row -------------------------------------------------- *
 * Each adds sum_i q_i x_i times the block's scales into the vector *acc, and the block's offset
 * or minimum terms into the scalar *c, which the row's total takes times the format's OFFSET
 * (below). sx: the sums of x over each of the format's SPAN weights in this block. Scales reach
 * the lanes as broadcast loads (from HALF, or from a small array on the stack), not through
 * register shuffles. */

static inline void avx2_q8_0(const uint8_t *b, const float *x, const float *sx, __m256 *acc, float *c) {
    (void)sx, (void)c;
    const uint8_t *q = b + 2;
    __m256 s = _mm256_mul_ps(flt(s8x8(q)), xat(x));
    s = FMA(flt(s8x8(q + 8)), xat(x + 8), s);
    s = FMA(flt(s8x8(q + 16)), xat(x + 16), s);
    s = FMA(flt(s8x8(q + 24)), xat(x + 24), s);
    *acc = FMA(s, _mm256_set1_ps(f16_at(b)), *acc);
}

/* Sum of 32 four-bit codes times x, the codes in 16 bytes at q (weight i low, i + 16 high). */
static inline __m256 nibbles32(const uint8_t *q, const float *x) {
    __m256i u = u8x8(q), v = u8x8(q + 8);
    __m256 s = _mm256_mul_ps(flt(low4(u)), xat(x));
    s = FMA(flt(low4(v)), xat(x + 8), s);
    s = FMA(flt(high4(u)), xat(x + 16), s);
    return FMA(flt(high4(v)), xat(x + 24), s);
}

static inline void avx2_q4_0(const uint8_t *b, const float *x, const float *sx, __m256 *acc, float *c) {
    float d = f16_at(b);
    *acc = FMA(nibbles32(b + 2, x), _mm256_set1_ps(d), *acc);
    *c += d * sx[0]; /* OFFSET -8: the codes' offset */
}

static inline void avx2_q4_1(const uint8_t *b, const float *x, const float *sx, __m256 *acc, float *c) {
    *acc = FMA(nibbles32(b + 4, x), _mm256_set1_ps(f16_at(b)), *acc);
    *c += f16_at(b + 2) * sx[0]; /* OFFSET 1: the block's minimum m, times the sum of its x */
}

/* Scales stored to a small array on the stack are read back one at a time as broadcast loads.
 * Left alone, the compiler sees through the store and pulls each element out of the register
 * instead (a shuffle, a blend and a broadcast: three micro-ops on the busiest port); this empty
 * statement tells it the array's memory may have changed, so it loads. */
#define FROM_MEMORY(array) __asm__("" : "+m"(array))

/* Q4_K's 8 minimums times the sums of x over their sub-blocks: 8 lanes, subtracted in the vector
 * accumulator rather than summed across lanes once per block. */
static inline __m256 q4_K_mins(const uint8_t *b, const uint8_t *mins, const float *sx) {
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(f16_at(b + 2)), flt(u8x8(mins))), xat(sx));
}

static inline void avx2_q4_K(const uint8_t *b, const float *x, const float *sx, __m256 *acc, float *c) {
    (void)c;
    uint8_t sm[16];
    float ds[8];
    q4_K_unpack(b + 4, sm);
    _mm256_storeu_ps(ds, _mm256_mul_ps(_mm256_set1_ps(f16_at(b)), flt(u8x8(sm))));
    FROM_MEMORY(ds);
    *acc = _mm256_sub_ps(*acc, q4_K_mins(b, sm + 8, sx));
    const uint8_t *q = b + 16;
    /* Four runs of 64 weights: 32 bytes, low nibbles sub-block 2j, high nibbles sub-block 2j + 1. */
    for (int j = 0; j < 4; j++, q += 32, x += 64) {
        __m256 lo = _mm256_setzero_ps(), hi = lo;
        for (int g = 0; g < 32; g += 8) {
            __m256i u = u8x8(q + g);
            lo = FMA(flt(low4(u)), xat(x + g), lo);
            hi = FMA(flt(high4(u)), xat(x + 32 + g), hi);
        }
        *acc = FMA(lo, _mm256_broadcast_ss(ds + 2 * j), *acc);
        *acc = FMA(hi, _mm256_broadcast_ss(ds + 2 * j + 1), *acc);
    }
}

/* Q6_K: each half of 128 weights has 64 bytes of low 4 bits (byte l: weight l low nibble, weight
 * l + 64 high; byte l + 32: weights l + 32 and l + 96) and 32 bytes of high 2 bits (byte l: bits
 * 0-1 for weight l, 2-3 for l + 32, 4-5 for l + 64, 6-7 for l + 96). The scale changes every 16
 * weights, so each 16 lanes of a run of 32 get their own sum. */
static inline void avx2_q6_K(const uint8_t *b, const float *x, const float *sx, __m256 *acc, float *c) {
    const uint8_t *ql = b, *qh = b + 128;
    const __m256i top = _mm256_set1_epi32(0x30);
    float ds[16]; /* d times each 16 weights' scale */
    __m256 d = _mm256_set1_ps(f16_at(b + 208));
    __m256 lo8 = _mm256_mul_ps(d, flt(s8x8(b + 192))), hi8 = _mm256_mul_ps(d, flt(s8x8(b + 200)));
    _mm256_storeu_ps(ds, lo8);
    _mm256_storeu_ps(ds + 8, hi8);
    FROM_MEMORY(ds);
    *c += hsum(FMA(hi8, xat(sx + 8), _mm256_mul_ps(lo8, xat(sx)))); /* OFFSET -32 */
    for (int h = 0; h < 2; h++, ql += 64, qh += 32, x += 128)
        for (int half = 0; half < 2; half++) { /* lanes 0-15, then 16-31, of each run of 32 */
            __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int l = 16 * half; l < 16 * half + 16; l += 8) {
                __m256i A = u8x8(ql + l), B = u8x8(ql + 32 + l), H = u8x8(qh + l);
                __m256i q0 = _mm256_or_si256(low4(A), _mm256_and_si256(_mm256_slli_epi32(H, 4), top));
                __m256i q1 = _mm256_or_si256(low4(B), _mm256_and_si256(_mm256_slli_epi32(H, 2), top));
                __m256i q2 = _mm256_or_si256(high4(A), _mm256_and_si256(H, top));
                __m256i q3 = _mm256_or_si256(high4(B), _mm256_and_si256(_mm256_srli_epi32(H, 2), top));
                s[0] = FMA(flt(q0), xat(x + l), s[0]);
                s[1] = FMA(flt(q1), xat(x + 32 + l), s[1]);
                s[2] = FMA(flt(q2), xat(x + 64 + l), s[2]);
                s[3] = FMA(flt(q3), xat(x + 96 + l), s[3]);
            }
            for (int g = 0; g < 4; g++) /* run g's 16 weights: scale 8 h + 2 g + half */
                *acc = FMA(s[g], _mm256_broadcast_ss(ds + 8 * h + 2 * g + half), *acc);
        }
}

/* ---- AVX2 dequantizing: one block to float32, in gguf-py's operations and order ------------ */

static inline void deq_q8_0(const uint8_t *b, float *w) {
    __m256 d = _mm256_set1_ps(f16_at(b));
    for (int i = 0; i < 32; i += 8) _mm256_storeu_ps(w + i, _mm256_mul_ps(flt(s8x8(b + 2 + i)), d));
}

/* The 32 codes of 16 bytes at q, as int32 lanes in weight order, into 4 vectors. */
static inline void codes32(const uint8_t *q, __m256i out[4]) {
    __m256i u = u8x8(q), v = u8x8(q + 8);
    out[0] = low4(u), out[1] = low4(v), out[2] = high4(u), out[3] = high4(v);
}

static inline void deq_q4_0(const uint8_t *b, float *w) {
    __m256 d = _mm256_set1_ps(f16_at(b));
    __m256i q[4];
    codes32(b + 2, q);
    for (int i = 0; i < 4; i++) _mm256_storeu_ps(w + 8 * i, _mm256_mul_ps(d, flt(_mm256_sub_epi32(q[i], _mm256_set1_epi32(8)))));
}

static inline void deq_q4_1(const uint8_t *b, float *w) {
    __m256 d = _mm256_set1_ps(f16_at(b)), m = _mm256_set1_ps(f16_at(b + 2));
    __m256i q[4];
    codes32(b + 4, q);
    for (int i = 0; i < 4; i++) _mm256_storeu_ps(w + 8 * i, _mm256_add_ps(_mm256_mul_ps(d, flt(q[i])), m));
}

static inline void deq_q4_K(const uint8_t *b, float *w) {
    float d = f16_at(b), dmin = f16_at(b + 2);
    uint8_t sc[8], m[8];
    q4_K_scales(b + 4, sc, m);
    for (int j = 0; j < 8; j++) { /* sub-block j: nibbles (j odd: high) of code bytes 32 (j / 2) .. + 31 */
        __m256 dj = _mm256_set1_ps(d * sc[j]), mj = _mm256_set1_ps(dmin * m[j]);
        for (int g = 0; g < 32; g += 8) {
            __m256i u = u8x8(b + 16 + 32 * (j / 2) + g);
            __m256 q = flt(j % 2 ? high4(u) : low4(u));
            _mm256_storeu_ps(w + 32 * j + g, _mm256_sub_ps(_mm256_mul_ps(dj, q), mj));
        }
    }
}

static inline void deq_q6_K(const uint8_t *b, float *w) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const __m256i top = _mm256_set1_epi32(0x30), bias = _mm256_set1_epi32(32);
    float d = f16_at(b + 208);
    for (int h = 0; h < 2; h++, ql += 64, qh += 32, sc += 8, w += 128)
        for (int l = 0; l < 32; l += 8) {
            __m256i A = u8x8(ql + l), B = u8x8(ql + 32 + l), H = u8x8(qh + l), q[4];
            q[0] = _mm256_or_si256(low4(A), _mm256_and_si256(_mm256_slli_epi32(H, 4), top));
            q[1] = _mm256_or_si256(low4(B), _mm256_and_si256(_mm256_slli_epi32(H, 2), top));
            q[2] = _mm256_or_si256(high4(A), _mm256_and_si256(H, top));
            q[3] = _mm256_or_si256(high4(B), _mm256_and_si256(_mm256_srli_epi32(H, 2), top));
            for (int g = 0; g < 4; g++) { /* weight 32 g + l, scale (32 g + l) / 16 */
                __m256 ds = _mm256_set1_ps(d * sc[2 * g + l / 16]);
                _mm256_storeu_ps(w + 32 * g + l, _mm256_mul_ps(ds, flt(_mm256_sub_epi32(q[g], bias))));
            }
        }
}

/* ---- Portable C: one block to float32, the same arithmetic, no intrinsics ------------------ */

/* IEEE half to float, by hand (F16C is an x86 extension): normal, subnormal, zero, inf and NaN. */
static float f16_portable(const uint8_t *p) {
    uint32_t h = (uint32_t)p[0] | (uint32_t)p[1] << 8, exp = (h >> 10) & 31, man = h & 1023;
    uint32_t bits = (h & 0x8000u) << 16;
    if (exp == 0) { /* zero or subnormal: man * 2^-24, exact in float32 */
        float f = (float)man * (1.0f / 16777216.0f);
        return bits ? -f : f;
    }
    bits |= exp == 31 ? 0x7f800000u | man << 13 : (exp + 112) << 23 | man << 13;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void port_q8_0(const uint8_t *b, float *w) {
    float d = f16_portable(b);
    for (int i = 0; i < 32; i++) w[i] = (float)(int8_t)b[2 + i] * d;
}

static void port_q4_0(const uint8_t *b, float *w) {
    float d = f16_portable(b);
    for (int i = 0; i < 16; i++) {
        w[i] = d * (float)((b[2 + i] & 15) - 8);
        w[i + 16] = d * (float)((b[2 + i] >> 4) - 8);
    }
}

static void port_q4_1(const uint8_t *b, float *w) {
    float d = f16_portable(b), m = f16_portable(b + 2);
    for (int i = 0; i < 16; i++) {
        w[i] = d * (float)(b[4 + i] & 15) + m;
        w[i + 16] = d * (float)(b[4 + i] >> 4) + m;
    }
}

static void port_q4_K(const uint8_t *b, float *w) {
    float d = f16_portable(b), dmin = f16_portable(b + 2);
    uint8_t sc[8], m[8];
    q4_K_scales(b + 4, sc, m);
    for (int j = 0; j < 8; j++) {
        float dj = d * sc[j], mj = dmin * m[j];
        const uint8_t *q = b + 16 + 32 * (j / 2);
        for (int l = 0; l < 32; l++) w[32 * j + l] = dj * (float)(j % 2 ? q[l] >> 4 : q[l] & 15) - mj;
    }
}

static void port_q6_K(const uint8_t *b, float *w) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = f16_portable(b + 208);
    for (int h = 0; h < 2; h++, ql += 64, qh += 32, sc += 8, w += 128)
        for (int l = 0; l < 32; l++) {
            int q[4] = {(ql[l] & 15) | ((qh[l] & 3) << 4), (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4),
                        (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4), (ql[l + 32] >> 4) | ((qh[l] >> 6) << 4)};
            for (int g = 0; g < 4; g++) w[32 * g + l] = (d * sc[2 * g + l / 16]) * (float)(q[g] - 32);
        }
}

/* ---- AVX-512 products: the AVX2 ones at 16 lanes ------------------------------------------ */

#define AVX512 __attribute__((target("avx512f")))
static inline AVX512 __m512i u8x16(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline AVX512 __m512i s8x16(const uint8_t *p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline AVX512 __m512 flt16(__m512i v) { return _mm512_cvtepi32_ps(v); }
static inline AVX512 __m512i low4x16(__m512i v) { return _mm512_and_si512(v, _mm512_set1_epi32(15)); }
static inline AVX512 __m512i high4x16(__m512i v) { return _mm512_srli_epi32(v, 4); }
static inline AVX512 __m512 x16(const float *x) { return _mm512_loadu_ps(x); }
static inline AVX512 __m512 bcast16(const float *p) { return _mm512_broadcastss_ps(_mm_load_ss(p)); }
static inline AVX512 float hsum16(__m512 v) { return _mm512_reduce_add_ps(v); }
#define FMA16(a, b, c) _mm512_fmadd_ps(a, b, c)

static inline AVX512 void avx512_q8_0(const uint8_t *b, const float *x, const float *sx, __m512 *acc, float *c) {
    (void)sx, (void)c;
    __m512 s = FMA16(flt16(s8x16(b + 18)), x16(x + 16), _mm512_mul_ps(flt16(s8x16(b + 2)), x16(x)));
    *acc = FMA16(s, _mm512_set1_ps(f16_at(b)), *acc);
}

/* A 4-bit code becomes its float in one permute: vpermps looks up 16 floats by the low 4 bits of
 * each lane, so the low nibble needs no mask, and neither needs an int-to-float conversion.
 * `values` holds the float of each code (Q4_0's already less its offset of 8). */
static inline AVX512 __m512 codes_lo(__m512i u, __m512 values) { return _mm512_permutexvar_ps(u, values); }
static inline AVX512 __m512 codes_hi(__m512i u, __m512 values) { return _mm512_permutexvar_ps(high4x16(u), values); }
static inline AVX512 __m512 counting(float from) {
    return _mm512_add_ps(_mm512_set1_ps(from), _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

/* One byte per lane: the low nibbles are weights 0-15 of the run, the high ones 16-31. */
static inline AVX512 __m512 nibbles32_16(const uint8_t *q, const float *x, __m512 values) {
    __m512i u = u8x16(q);
    return FMA16(codes_hi(u, values), x16(x + 16), _mm512_mul_ps(codes_lo(u, values), x16(x)));
}

static inline AVX512 void avx512_q4_0(const uint8_t *b, const float *x, const float *sx, __m512 *acc, float *c) {
    (void)sx, (void)c; /* the table holds q - 8: no offset term */
    *acc = FMA16(nibbles32_16(b + 2, x, counting(-8)), _mm512_set1_ps(f16_at(b)), *acc);
}

static inline AVX512 void avx512_q4_1(const uint8_t *b, const float *x, const float *sx, __m512 *acc, float *c) {
    *acc = FMA16(nibbles32_16(b + 4, x, counting(0)), _mm512_set1_ps(f16_at(b)), *acc);
    *c += f16_at(b + 2) * sx[0];
}

static inline AVX512 void avx512_q4_K(const uint8_t *b, const float *x, const float *sx, __m512 *acc, float *c) {
    (void)c;
    uint8_t sm[16];
    float ds[8];
    q4_K_unpack(b + 4, sm);
    _mm256_storeu_ps(ds, _mm256_mul_ps(_mm256_set1_ps(f16_at(b)), flt(u8x8(sm))));
    FROM_MEMORY(ds);
    *acc = _mm512_sub_ps(*acc, _mm512_zextps256_ps512(q4_K_mins(b, sm + 8, sx)));
    const uint8_t *q = b + 16;
    const __m512 values = counting(0);
    for (int j = 0; j < 4; j++, q += 32, x += 64) {
        __m512i u = u8x16(q), v = u8x16(q + 16);
        __m512 lo = FMA16(codes_lo(v, values), x16(x + 16), _mm512_mul_ps(codes_lo(u, values), x16(x)));
        __m512 hi = FMA16(codes_hi(v, values), x16(x + 48), _mm512_mul_ps(codes_hi(u, values), x16(x + 32)));
        *acc = FMA16(lo, bcast16(ds + 2 * j), *acc);
        *acc = FMA16(hi, bcast16(ds + 2 * j + 1), *acc);
    }
}

/* 16 lanes are exactly one scale's span: each vector of codes gets its scale before the sum. */
static inline AVX512 void avx512_q6_K(const uint8_t *b, const float *x, const float *sx, __m512 *acc, float *c) {
    const uint8_t *ql = b, *qh = b + 128;
    const __m512i top = _mm512_set1_epi32(0x30);
    float ds[16];
    __m512 scales = _mm512_mul_ps(_mm512_set1_ps(f16_at(b + 208)), flt16(s8x16(b + 192)));
    _mm512_storeu_ps(ds, scales);
    FROM_MEMORY(ds);
    *c += hsum16(_mm512_mul_ps(scales, x16(sx)));
    for (int h = 0; h < 2; h++, ql += 64, qh += 32, x += 128)
        for (int half = 0; half < 2; half++) {
            int l = 16 * half;
            __m512i A = u8x16(ql + l), B = u8x16(ql + 32 + l), H = u8x16(qh + l), q[4];
            q[0] = _mm512_or_si512(low4x16(A), _mm512_and_si512(_mm512_slli_epi32(H, 4), top));
            q[1] = _mm512_or_si512(low4x16(B), _mm512_and_si512(_mm512_slli_epi32(H, 2), top));
            q[2] = _mm512_or_si512(high4x16(A), _mm512_and_si512(H, top));
            q[3] = _mm512_or_si512(high4x16(B), _mm512_and_si512(_mm512_srli_epi32(H, 2), top));
            for (int g = 0; g < 4; g++)
                *acc = FMA16(_mm512_mul_ps(flt16(q[g]), bcast16(ds + 8 * h + 2 * g + half)), x16(x + 32 * g + l), *acc);
        }
}

static inline int avx512_runs(void) { return __builtin_cpu_supports("avx512f"); }

/* ---- Rows: each format's products over STREAMS rows (or one), and the table of formats ------ */

/* y[i * ystride] = row i . x for n rows (n = STREAMS or 1, a constant once inlined), row i at
 * r + i * stride; nb blocks per row. The four rows advance together, block by block. ISA: avx2
 * or avx512, with its vector type V, zero and horizontal sum; OFFSET: what the format's *c terms
 * are multiplied by (Q4_0's codes are offset by 8, Q6_K's by 32; Q4_1 adds its minimums). */
#define ROWS(ISA, ATTR, V, ZERO, HSUM, NAME, BLOCK, BYTES, SPAN, OFFSET)                          \
    static inline __attribute__((always_inline)) ATTR void rows_##ISA##_##NAME##_n(               \
        const uint8_t *r, long stride, int n, long nb, const float *x, const float *sx, float *y, \
        long ystride) {                                                                           \
        V a[STREAMS];                                                                             \
        float c[STREAMS];                                                                         \
        for (int i = 0; i < n; i++) a[i] = ZERO(), c[i] = 0;                                      \
        for (long k = 0; k < nb; k++)                                                             \
            for (int i = 0; i < n; i++)                                                           \
                ISA##_##NAME(r + i * stride + k * BYTES, x + k * BLOCK, sx + k * (BLOCK / SPAN),  \
                             &a[i], &c[i]);                                                       \
        for (int i = 0; i < n; i++) y[i * ystride] = HSUM(a[i]) + (OFFSET) * c[i];                \
    }                                                                                             \
    static ATTR void rows_##ISA##_##NAME(const uint8_t *r, long stride, long nb, const float *x,  \
                                         const float *sx, float *y, long ystride) {               \
        rows_##ISA##_##NAME##_n(r, stride, STREAMS, nb, x, sx, y, ystride);                       \
    }                                                                                             \
    static ATTR void row_##ISA##_##NAME(const uint8_t *r, long nb, const float *x, const float *sx, \
                                        float *y) {                                               \
        rows_##ISA##_##NAME##_n(r, 0, 1, nb, x, sx, y, 0);                                        \
    }
#define NO_ATTR
#define FORMAT_ROWS(NAME, BLOCK, BYTES, SPAN, OFFSET)                                             \
    ROWS(avx2, NO_ATTR, __m256, _mm256_setzero_ps, hsum, NAME, BLOCK, BYTES, SPAN, OFFSET)       \
    ROWS(avx512, AVX512, __m512, _mm512_setzero_ps, hsum16, NAME, BLOCK, BYTES, SPAN, OFFSET)    \
    static void deq_##NAME##_fn(const uint8_t *b, float *w) { deq_##NAME(b, w); }

FORMAT_ROWS(q8_0, 32, 34, 32, 0)
FORMAT_ROWS(q4_0, 32, 18, 32, -8)
FORMAT_ROWS(q4_1, 32, 20, 32, 1)
FORMAT_ROWS(q4_K, 256, 144, 32, 0)
FORMAT_ROWS(q6_K, 256, 210, 16, -32)

typedef struct {
    void (*rows)(const uint8_t *, long, long, const float *, const float *, float *, long);
    void (*row)(const uint8_t *, long, const float *, const float *, float *);
} Products;

typedef struct {
    long type, block, bytes, span; /* span: the runs of x its products sum (ROWS' SPAN) */
    Products avx2, avx512;
    void (*deq)(const uint8_t *, float *);          /* AVX2 */
    void (*deq_portable)(const uint8_t *, float *); /* plain C */
} Format;

#define FORMAT(ID, NAME, BLOCK, BYTES, SPAN)                                                           \
    {ID, BLOCK, BYTES, SPAN, {rows_avx2_##NAME, row_avx2_##NAME}, {rows_avx512_##NAME, row_avx512_##NAME}, \
     deq_##NAME##_fn, port_##NAME}
static const Format FORMATS[] = {
    FORMAT(Q8_0, q8_0, 32, 34, 32), FORMAT(Q4_0, q4_0, 32, 18, 32), FORMAT(Q4_1, q4_1, 32, 20, 32),
    FORMAT(Q4_K, q4_K, 256, 144, 32), FORMAT(Q6_K, q6_K, 256, 210, 16),
};
#define N_FORMATS (long)(sizeof(FORMATS) / sizeof(FORMATS[0]))

static const Format *format_of(long type) {
    for (long i = 0; i < N_FORMATS; i++)
        if (FORMATS[i].type == type) return &FORMATS[i];
    return NULL;
}

/* ---- Exports ------------------------------------------------------------------------------ */

/* The formats this file decodes, exported so that Python checks its own declaration
 * (tracer/quant.py) against them instead of trusting two copies: the i-th format's ggml type id,
 * weights per block and bytes per block; returns 0, or -1 past the last format. */
int quant_format(long i, long *type, long *block, long *bytes) {
    if (i < 0 || i >= N_FORMATS) return -1;
    *type = FORMATS[i].type, *block = FORMATS[i].block, *bytes = FORMATS[i].bytes;
    return 0;
}

/* Sums of x over each run of `span` weights (the offsets' and minimums' factor). */
static void span_sums(const float *x, long K, long span, float *sx) {
    for (long s = 0; s < K / span; s++) {
        float t = 0;
        for (long i = 0; i < span; i++) t += x[s * span + i];
        sx[s] = t;
    }
}

static void matvec_simd(const Products *p, const Format *f, const uint8_t *W, const float *x, float *y,
                        long N, long K, int team) {
    long nb = K / f->block, stride = nb * f->bytes, G = N / STREAMS;
    float sx[K / MIN_SPAN + 1]; /* + 1: never a zero-length array */
    span_sums(x, K, f->span, sx);
    _Pragma("omp parallel num_threads(team)")
    {
        /* stream i reads row g + i * G, as in matvec.c; the last N % 4 rows one at a time */
        _Pragma("omp for schedule(static) nowait")
        for (long g = 0; g < G; g++) p->rows(W + g * stride, G * stride, nb, x, sx, y + g, G);
        _Pragma("omp for schedule(static) nowait")
        for (long n = STREAMS * G; n < N; n++) p->row(W + n * stride, nb, x, sx, y + n);
    }
}

/* Each block dequantized (plain C) then multiplied, summed in float32 in weight order. */
static void matvec_portable(const Format *f, const uint8_t *W, const float *x, float *y, long N, long K, int team) {
    long nb = K / f->block, stride = nb * f->bytes;
    _Pragma("omp parallel for num_threads(team) schedule(static)")
    for (long n = 0; n < N; n++) {
        float w[MAX_BLOCK], s = 0;
        for (long k = 0; k < nb; k++) {
            f->deq_portable(W + n * stride + k * f->bytes, w);
            for (long i = 0; i < f->block; i++) s += w[i] * x[k * f->block + i];
        }
        y[n] = s;
    }
}

/* The paths a call can take (its `path` argument): "auto" is AVX-512 where the CPU has it, else
 * AVX2. Dequantizing has no AVX-512 code of its own (a prompt's time is the matmul's): it takes
 * the AVX2 code there. */
enum { AUTO, PORTABLE, AVX2, AVX512_PATH, N_PATHS };
static const char *const PATH_NAMES[N_PATHS] = {"auto", "portable", "avx2", "avx512"};

/* Path i's name, and whether this CPU runs it (*runs); NULL past the last path. Exported so that
 * Python names the paths as this file does. */
const char *quant_path(long i, int *runs) {
    if (i < 0 || i >= N_PATHS) return NULL;
    *runs = i != AVX512_PATH || avx512_runs();
    return PATH_NAMES[i];
}

/* Checks shared by both entry points: 0, or the error code they return. */
static int check(const Format *f, long K, int path) {
    if (!f) return -1;
    if (K % f->block) return -2;
    if (path < 0 || path >= N_PATHS || (path == AVX512_PATH && !avx512_runs())) return -3;
    return 0;
}

/* y[n] = W[n] . x for W [N, K] of `type` blocks (rows of K / block blocks, back to back), x and y
 * float32, along `path`. Returns 0; -1 for a type not in FORMATS, -2 for K not a multiple of its
 * block, -3 for a path this CPU cannot take. Small products stay on one thread (see matvec.c). */
int quant_matvec(long type, const uint8_t *W, const float *x, float *y, long N, long K, int threads, int path) {
    const Format *f = format_of(type);
    int status = check(f, K, path);
    if (status) return status;
    int team = (N * K >= 65536 && threads > 1) ? threads : 1;
    if (path == PORTABLE)
        matvec_portable(f, W, x, y, N, K, team);
    else
        matvec_simd(path == AVX2 || !avx512_runs() ? &f->avx2 : &f->avx512, f, W, x, y, N, K, team);
    return 0;
}

/* out [N, K] float32 = the N rows of `type` blocks at W, dequantized exactly as gguf-py does.
 * Returns as quant_matvec does. */
int quant_dequantize(long type, const uint8_t *W, float *out, long N, long K, int threads, int path) {
    const Format *f = format_of(type);
    int status = check(f, K, path);
    if (status) return status;
    long blocks = N * (K / f->block);
    void (*deq)(const uint8_t *, float *) = path == PORTABLE ? f->deq_portable : f->deq;
    int team = (N * K >= 65536 && threads > 1) ? threads : 1;
    _Pragma("omp parallel for num_threads(team) schedule(static)")
    for (long k = 0; k < blocks; k++) deq(W + k * f->bytes, out + k * f->block);
    return 0;
}
