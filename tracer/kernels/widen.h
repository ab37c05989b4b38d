/* What both kernels (matvec.c, attend.c) need: 16-bit and 32-bit floats widened to float32, eight
 * at a time or one, and float32 rounded back to the storage type as torch rounds. */
#ifndef LLAMA_TRACER_WIDEN_H
#define LLAMA_TRACER_WIDEN_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
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

/* Eight float32 sums rounded to the storage type at once (one at a time for bfloat16). */
static inline void store8_f32(float *y, __m256 v) { _mm256_storeu_ps(y, v); }
static inline void store8_f16(uint16_t *y, __m256 v) {
    _mm_storeu_si128((__m128i *)y, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
static inline void store8_bf16(uint16_t *y, __m256 v) {
    float f[8];
    _mm256_storeu_ps(f, v);
    for (int i = 0; i < 8; i++) store_bf16(y + i, f[i]);
}

#endif
