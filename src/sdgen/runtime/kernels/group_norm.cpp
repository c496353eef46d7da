// GroupNorm (Wu and He 2018) followed by SiLU, as every SD ResBlock and output head applies them,
// in two passes over a bf16 NCHW tensor.
//
// Why: PyTorch writes the normalised tensor in bf16 and reads it back for SiLU; in the VAE's
// 512x512 levels each of those passes moves 64 MiB. Here pass 1 takes each group's statistics
// and pass 2 writes silu(gamma * (x - mean) / sqrt(var + eps) + beta) once, rounded once.
//
// Input (batch, channels, *spatial) bf16 contiguous; weight and bias (channels) fp32.

#include "vector_math.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace {

using namespace sdgen_kernels;

inline float bf16_to_float(uint16_t value) {
    const uint32_t bits = static_cast<uint32_t>(value) << 16;
    float result;
    std::memcpy(&result, &bits, sizeof(result));
    return result;
}

// Mean and variance of `count` bf16 values. Sums are taken of x - x[0] (so that a large mean
// does not cancel the variance), in fp32 lanes over blocks of 4,096 values, then in double.
void moments(const uint16_t* values, int64_t count, double& mean, double& variance) {
    const float shift = bf16_to_float(values[0]);
    const __m512 shift_vector = _mm512_set1_ps(shift);
    double sum = 0.0, squares = 0.0;
    for (int64_t block = 0; block < count; block += 4096) {
        const int64_t end = std::min<int64_t>(count, block + 4096);
        __m512 s = _mm512_setzero_ps(), q = _mm512_setzero_ps();
        for (int64_t i = block; i < end; i += 16) {
            const __mmask16 valid = first_lanes(end - i);
            const __m512 v = _mm512_maskz_sub_ps(valid, load_bf16(values + i, valid), shift_vector);
            s = _mm512_add_ps(s, v);
            q = _mm512_fmadd_ps(v, v, q);
        }
        sum += _mm512_reduce_add_ps(s);
        squares += _mm512_reduce_add_ps(q);
    }
    const double shifted_mean = sum / count;
    mean = shift + shifted_mean;
    variance = std::max(0.0, squares / count - shifted_mean * shifted_mean);
}

at::Tensor group_norm_silu(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                           double eps) {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() >= 2,
                "group_norm_silu kernel: a contiguous bf16 (batch, channels, ...) tensor expected");
    const int64_t batch = x.size(0), channels = x.size(1), spatial = x.numel() / std::max<int64_t>(1, batch * channels);
    TORCH_CHECK(groups > 0 && channels % groups == 0 && weight.scalar_type() == at::kFloat &&
                bias.scalar_type() == at::kFloat && weight.numel() == channels && bias.numel() == channels &&
                weight.is_contiguous() && bias.is_contiguous(), "group_norm_silu kernel: inconsistent arguments");
    at::Tensor out = at::empty(x.sizes(), x.options());
    const int64_t per_group = channels / groups;
    const auto* in_data = reinterpret_cast<const uint16_t*>(x.data_ptr());
    auto* out_data = reinterpret_cast<uint16_t*>(out.data_ptr());
    const float* gamma = weight.data_ptr<float>();
    const float* beta = bias.data_ptr<float>();
    at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
            const int64_t first_channel = (task % groups) * per_group;
            const int64_t offset = task * per_group * spatial;  // (batch, group) blocks are contiguous in NCHW
            if (per_group * spatial == 0) continue;
            double mean, variance;
            moments(in_data + offset, per_group * spatial, mean, variance);
            const double inverse_std = 1.0 / std::sqrt(variance + eps);
            for (int64_t c = 0; c < per_group; ++c) {
                const float scale = static_cast<float>(gamma[first_channel + c] * inverse_std);
                const __m512 scale_vector = _mm512_set1_ps(scale);
                const __m512 shift_vector = _mm512_set1_ps(static_cast<float>(beta[first_channel + c] - mean * scale));
                const uint16_t* source = in_data + offset + c * spatial;
                uint16_t* destination = out_data + offset + c * spatial;
                for (int64_t i = 0; i < spatial; i += 16) {
                    const __mmask16 valid = first_lanes(spatial - i);
                    const __m512 y = _mm512_fmadd_ps(load_bf16(source + i, valid), scale_vector, shift_vector);
                    store_bf16(destination + i, silu(y), valid);
                }
            }
        }
    });
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sdgen_kernels, m) {
    m.def("group_norm_silu(Tensor x, int groups, Tensor weight, Tensor bias, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(sdgen_kernels, CPU, m) {
    m.impl("group_norm_silu", &group_norm_silu);
}
