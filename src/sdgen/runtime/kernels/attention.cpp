// bf16 attention for CPUs with AVX-512 BF16: softmax(q k^T * scale) v with fp32 scores.
//
// Why: SD's self-attention has head sizes of 40 to 160 and 1,024 to 4,096 keys. PyTorch 2.13's
// CPU kernels run it far below the bf16 matrix-product rate on CPUs without AMX (its flash
// attention converts to fp32; a bf16 mm with an inner size of 40 reaches a third of the GEMM
// peak), and its softmax exp runs at a few G elements/s. Here each task takes six query rows
// through the whole key sequence: their scores (six rows of fp32, in L2), the softmax with a
// polynomial exp, and the value product, all with VDPBF16PS (two bf16 products per fp32 lane).
//
// Layouts (prepared by sdgen/runtime/kernels/__init__.py):
//   q      (heads, queries, dim)            bf16, dim even
//   kp     (heads, dim / 2, keys_padded)     int32: the bf16 pairs (k[s][2p], k[s][2p+1])
//   vp     (heads, keys_padded / 2, dim_padded, 2) bf16: the key pairs (v[2t][d], v[2t+1][d])
// keys_padded is a multiple of 16 and dim_padded of 8, both zero-filled past the real sizes.
// Output (heads, queries, dim) bf16: each value rounded once, after the fp32 normalisation.

#include "vector_math.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using namespace sdgen_kernels;

constexpr int kRows = 6;     // query rows per task: 6 x 4 accumulators + 4 loads + 1 broadcast fit 32 registers
constexpr int kVectors = 4;  // 16-lane fp32 vectors per tile column block

inline __m512 dot_pairs(__m512 acc, __m512i pairs_a, __m512i pairs_b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)pairs_a, (__m512bh)pairs_b);
}

// scores[r][16 * c ...] = sum_p q[r] pair p . kp[p][column + 16 c ...], for C vectors of keys; each
// row's running maximum over its first `keys` scores is kept in maxima[r] (lane-wise).
template <int C>
inline void score_tile(const uint32_t* const* q_rows, const uint32_t* kp, int64_t pairs, int64_t keys_padded,
                       int64_t column, int64_t keys, float* scores, __m512* maxima) {
    __m512 acc[kRows][C];
    for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
        const uint32_t* k_row = kp + p * keys_padded + column;
        __m512i k[C];
        for (int c = 0; c < C; ++c) k[c] = _mm512_loadu_si512(k_row + 16 * c);
        for (int r = 0; r < kRows; ++r) {
            const __m512i q = _mm512_set1_epi32(static_cast<int>(q_rows[r][p]));
            for (int c = 0; c < C; ++c) acc[r][c] = dot_pairs(acc[r][c], q, k[c]);
        }
    }
    for (int r = 0; r < kRows; ++r) {
        __m512 max = maxima[r];
        for (int c = 0; c < C; ++c) {
            _mm512_storeu_ps(scores + r * keys_padded + column + 16 * c, acc[r][c]);
            max = _mm512_mask_max_ps(max, first_lanes(keys - column - 16 * c), max, acc[r][c]);
        }
        maxima[r] = max;
    }
}

// out[r][column + 16 c ...] = sum_t weights[r] pair t . vp[t][column + 16 c ...] / row_sum[r], for C
// vectors of 16 columns and, when Half, 8 more in a 256-bit register: a head size of 40 is 2.5
// vectors, and CPUs that split 512-bit operations in two (AMD Zen 4) do the half at half the cost.
template <int C, bool Half>
inline void value_tile(const uint32_t* weights, int64_t key_pairs, const uint32_t* vp, int64_t dim_padded,
                       int64_t column, const float* inverse_sums, float* out) {
    __m512 acc[kRows][C > 0 ? C : 1];
    __m256 acc_half[kRows];
    for (int r = 0; r < kRows; ++r) {
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
        if (Half) acc_half[r] = _mm256_setzero_ps();
    }
    for (int64_t t = 0; t < key_pairs; ++t) {
        const uint32_t* v_row = vp + t * dim_padded + column;
        __m512i v[C > 0 ? C : 1];
        for (int c = 0; c < C; ++c) v[c] = _mm512_loadu_si512(v_row + 16 * c);
        __m256i v_half = Half ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v_row + 16 * C))
                              : _mm256_setzero_si256();
        for (int r = 0; r < kRows; ++r) {
            const __m512i w = _mm512_set1_epi32(static_cast<int>(weights[r * key_pairs + t]));
            for (int c = 0; c < C; ++c) acc[r][c] = dot_pairs(acc[r][c], w, v[c]);
            if (Half)
                acc_half[r] = _mm256_dpbf16_ps(acc_half[r], (__m256bh)_mm512_castsi512_si256(w), (__m256bh)v_half);
        }
    }
    for (int r = 0; r < kRows; ++r) {
        const __m512 inverse = _mm512_set1_ps(inverse_sums[r]);
        for (int c = 0; c < C; ++c)
            _mm512_storeu_ps(out + r * dim_padded + column + 16 * c, _mm512_mul_ps(acc[r][c], inverse));
        if (Half)
            _mm256_storeu_ps(out + r * dim_padded + column + 16 * C,
                             _mm256_mul_ps(acc_half[r], _mm512_castps512_ps256(inverse)));
    }
}

// Calls tile(C, column) over `vectors` 16-lane vectors of columns, four at a time, then the rest;
// five left go as three and two, since a tile of one vector waits on its loads.
template <typename Tile>
inline void by_column_blocks(int64_t vectors, Tile tile) {
    int64_t v = 0;
    for (; v + kVectors <= vectors && vectors - v != kVectors + 1; v += kVectors)
        tile(std::integral_constant<int, kVectors>{}, 16 * v);
    if (vectors - v == kVectors + 1) {
        tile(std::integral_constant<int, 3>{}, 16 * v);
        v += 3;
    }
    switch (vectors - v) {
        case 3: tile(std::integral_constant<int, 3>{}, 16 * v); break;
        case 2: tile(std::integral_constant<int, 2>{}, 16 * v); break;
        case 1: tile(std::integral_constant<int, 1>{}, 16 * v); break;
        default: break;
    }
}

// The value product over dim_padded columns (a multiple of 8): whole vectors four at a time, and
// a last half vector joined to the tile before it when that tile has room.
template <typename Tile>
inline void by_value_blocks(int64_t dim_padded, Tile tile) {
    const int64_t vectors = dim_padded / 16;
    if (dim_padded % 16 == 0) {
        by_column_blocks(vectors, [&](auto c, int64_t column) { tile(c, std::false_type{}, column); });
        return;
    }
    const int64_t whole = vectors % kVectors == 3 ? vectors : vectors - vectors % kVectors;
    by_column_blocks(whole, [&](auto c, int64_t column) { tile(c, std::false_type{}, column); });
    switch (vectors - whole) {
        case 2: tile(std::integral_constant<int, 2>{}, std::true_type{}, 16 * whole); break;
        case 1: tile(std::integral_constant<int, 1>{}, std::true_type{}, 16 * whole); break;
        default: tile(std::integral_constant<int, 0>{}, std::true_type{}, 16 * whole); break;
    }
}

// Softmax of one row of unscaled scores over its first `keys` entries, with `scale` applied
// inside the exponent (scale > 0, so the maximum of the unscaled scores is the one to subtract),
// written as bf16 (zero past `keys`, up to keys_padded); returns 1 / (sum of the fp32 exponentials).
inline float softmax_row(const float* scores, float row_max, float scale, int64_t keys, int64_t keys_padded,
                         uint16_t* weights) {
    const __m512 scale_vector = _mm512_set1_ps(scale), shift = _mm512_set1_ps(row_max * scale);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t s = 0; s < keys_padded; s += 16) {
        const __m512 e = _mm512_maskz_mov_ps(
            first_lanes(keys - s), exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(scores + s), scale_vector, shift)));
        sum = _mm512_add_ps(sum, e);
        store_bf16(weights + s, e);
    }
    return 1.0f / _mm512_reduce_add_ps(sum);
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp, int64_t keys, double scale) {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 && vp.scalar_type() == at::kBFloat16 && kp.scalar_type() == at::kInt,
                "attention kernel: q and vp must be bfloat16, kp int32");
    TORCH_CHECK(q.dim() == 3 && kp.dim() == 3 && vp.dim() == 4 && q.is_contiguous() && kp.is_contiguous() &&
                vp.is_contiguous(), "attention kernel: contiguous (heads, tokens, dim) tensors expected");
    const int64_t heads = q.size(0), queries = q.size(1), dim = q.size(2);
    const int64_t pairs = kp.size(1), keys_padded = kp.size(2), dim_padded = vp.size(2);
    TORCH_CHECK(dim % 2 == 0 && pairs * 2 == dim && keys_padded % 16 == 0 && dim_padded % 8 == 0 &&
                dim_padded >= dim && vp.size(1) * 2 == keys_padded && 0 < keys && keys <= keys_padded &&
                kp.size(0) == heads && vp.size(0) == heads, "attention kernel: inconsistent shapes");
    TORCH_CHECK(scale > 0, "attention kernel: the score scale must be positive");
    at::Tensor out = at::empty({heads, queries, dim}, q.options());
    const int64_t tiles = (queries + kRows - 1) / kRows;
    const auto* q_data = reinterpret_cast<const uint16_t*>(q.data_ptr());
    const auto* kp_data = reinterpret_cast<const uint32_t*>(kp.data_ptr());
    const auto* vp_data = reinterpret_cast<const uint32_t*>(vp.data_ptr());
    auto* out_data = reinterpret_cast<uint16_t*>(out.data_ptr());
    const float score_scale = static_cast<float>(scale);

    at::parallel_for(0, heads * tiles, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores(kRows * keys_padded);
        std::vector<uint16_t> weights(kRows * keys_padded);
        std::vector<float> values(kRows * dim_padded);
        std::vector<uint16_t> padded_q(kRows * dim, 0);  // the last tile's rows past `queries` are zeros
        float inverse_sums[kRows];
        for (int64_t task = begin; task < end; ++task) {
            const int64_t head = task / tiles, first = (task % tiles) * kRows;
            const int64_t rows = std::min<int64_t>(kRows, queries - first);
            const uint16_t* q_head = q_data + (head * queries + first) * dim;
            if (rows < kRows) {
                std::fill(padded_q.begin(), padded_q.end(), 0);
                std::memcpy(padded_q.data(), q_head, rows * dim * sizeof(uint16_t));
                q_head = padded_q.data();
            }
            const uint32_t* q_rows[kRows];
            for (int r = 0; r < kRows; ++r) q_rows[r] = reinterpret_cast<const uint32_t*>(q_head + r * dim);
            const uint32_t* k_head = kp_data + head * pairs * keys_padded;
            __m512 maxima[kRows];
            for (int r = 0; r < kRows; ++r) maxima[r] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
            by_column_blocks(keys_padded / 16, [&](auto c, int64_t column) {
                score_tile<decltype(c)::value>(q_rows, k_head, pairs, keys_padded, column, keys, scores.data(),
                                               maxima);
            });
            for (int r = 0; r < kRows; ++r)
                inverse_sums[r] = softmax_row(scores.data() + r * keys_padded, _mm512_reduce_max_ps(maxima[r]),
                                              score_scale, keys, keys_padded, weights.data() + r * keys_padded);
            const uint32_t* v_head = vp_data + head * (keys_padded / 2) * dim_padded;
            const auto* weight_pairs = reinterpret_cast<const uint32_t*>(weights.data());
            by_value_blocks(dim_padded, [&](auto c, auto half, int64_t column) {
                value_tile<decltype(c)::value, decltype(half)::value>(weight_pairs, keys_padded / 2, v_head, dim_padded, column,
                                               inverse_sums, values.data());
            });
            for (int64_t r = 0; r < rows; ++r) {
                uint16_t* destination = out_data + (head * queries + first + r) * dim;
                const float* source = values.data() + r * dim_padded;
                for (int64_t d = 0; d < dim; d += 16)
                    store_bf16(destination + d, _mm512_maskz_loadu_ps(first_lanes(dim - d), source + d), first_lanes(dim - d));
            }
        }
    });
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sdgen_kernels, m) {
    m.def("attention(Tensor q, Tensor kp, Tensor vp, int keys, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(sdgen_kernels, CPU, m) {
    m.impl("attention", &attention);
}
