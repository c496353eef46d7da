// Vector math for sdgen's AVX-512 kernels: fp32 functions on 16 lanes, and bf16 loads and stores.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace sdgen_kernels {

// e^x for x in [-87, 88] (e^-87 is about 1.6e-38, e^88 about 1.7e38, both finite):
// n = round(x / ln 2), r = x - n ln 2 in two parts (Cody and Waite), e^r by a degree-3 polynomial
// fitted for the least maximum relative error on |r| <= ln 2 / 2 (7.5e-5, far below the 2e-3 of
// the bf16 values it becomes), then scaled by 2^n.
inline __m512 exp_in_range(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(0.16566842f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.50496332f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0001642f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.99992807f));
    return _mm512_scalef_ps(p, n);
}

inline __m512 exp_fast(__m512 x) {
    return exp_in_range(_mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f)));
}

// e^x for x <= 0 (a softmax's scores less their maximum): one clamp fewer.
inline __m512 exp_nonpositive(__m512 x) {
    return exp_in_range(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)));
}

// 1 / d to about 2^-28: the 14-bit estimate and one Newton step.
inline __m512 reciprocal(__m512 d) {
    const __m512 t = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(t, _mm512_fnmadd_ps(d, t, _mm512_set1_ps(2.0f)));
}

// SiLU (Elfwing et al. 2018), x sigmoid(x) = x / (1 + e^-x).
inline __m512 silu(__m512 x) {
    return _mm512_mul_ps(x, reciprocal(_mm512_add_ps(_mm512_set1_ps(1.0f), exp_fast(_mm512_sub_ps(_mm512_setzero_ps(), x)))));
}

// The exact GELU, x Phi(x) = x (1 + erf(x / sqrt 2)) / 2 (Hendrycks and Gimpel 2016), with
// 1 + erf(z) from erfc(|z|) = t (a1 + a2 t + ... + a5 t^4) e^(-z^2), t = 1 / (1 + p |z|)
// (Abramowitz and Stegun 7.1.26, absolute error under 1.5e-7), so that large negative inputs
// lose no digits to cancellation.
inline __m512 gelu(__m512 x) {
    const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
    const __m512 a = _mm512_abs_ps(z);
    const __m512 t = reciprocal(_mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    const __m512 erfc = _mm512_mul_ps(_mm512_mul_ps(p, t), exp_fast(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a)));
    const __mmask16 negative = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 one_plus_erf = _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(2.0f), erfc), erfc);
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), one_plus_erf);
}

// 16 bf16 values widened to fp32 (a bf16 is the high half of an fp32).
inline __m512 load_bf16(const uint16_t* source) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512 load_bf16(const uint16_t* source, __mmask16 valid) {
    const __m256i raw = _mm256_maskz_loadu_epi16(valid, source);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Rounded to nearest even (VCVTNEPS2BF16) and stored; `valid` lanes only.
inline void store_bf16(uint16_t* destination, __m512 values, __mmask16 valid = 0xFFFF) {
    _mm256_mask_storeu_epi16(destination, valid, (__m256i)_mm512_cvtneps_pbh(values));
}

inline __mmask16 first_lanes(int64_t count) {
    return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}

}  // namespace sdgen_kernels
