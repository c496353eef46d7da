// GroupNorm (Wu and He 2018), optionally followed by SiLU as every SD ResBlock and output head
// applies it, in two passes over a bf16 tensor in NCHW or NHWC (channels-last) layout.
//
// Why: PyTorch writes the normalised tensor in bf16 and reads it back for SiLU; in the VAE's
// 512x512 levels each of those passes moves 64 MiB. Here pass 1 takes each group's statistics
// and pass 2 writes silu(gamma * (x - mean) / sqrt(var + eps) + beta) once, rounded once. The
// prepacked oneDNN convolutions of the fast path return channels-last tensors, so NHWC is the
// layout these mostly see.
//
// Input (batch, channels, *spatial) bf16, contiguous or (4-D) channels-last; weight and bias
// (channels) fp32. The output has the input's layout.

#include "vector_math.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

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

inline __m512 activation(__m512 y, bool apply_silu) {
    return apply_silu ? silu(y) : y;
}

void group_norm_nchw(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias, double eps,
                     bool apply_silu, at::Tensor& out) {
    const int64_t batch = x.size(0), channels = x.size(1), spatial = x.numel() / std::max<int64_t>(1, batch * channels);
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
                    store_bf16(destination + i, activation(y, apply_silu), valid);
                }
            }
        }
    });
}

constexpr int64_t kPixelBlock = 128;  // NHWC: pixels per task
constexpr int kChunkVectors = 4;      // NHWC: channels per register-held chunk, in 16-lane vectors
constexpr int64_t kChunk = 16 * kChunkVectors;

// NHWC: each task sums its block of pixels per channel (x - x[pixel 0] per channel, fp32 lanes
// across channels, then double); the group statistics combine the channels' shifted sums.
void group_norm_nhwc(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias, double eps,
                     bool apply_silu, at::Tensor& out) {
    const int64_t batch = x.size(0), channels = x.size(1), pixels = x.size(2) * x.size(3);
    const int64_t per_group = channels / groups, blocks = (pixels + kPixelBlock - 1) / kPixelBlock;
    const auto* in_data = reinterpret_cast<const uint16_t*>(x.data_ptr());
    auto* out_data = reinterpret_cast<uint16_t*>(out.data_ptr());
    const float* gamma = weight.data_ptr<float>();
    const float* beta = bias.data_ptr<float>();
    if (pixels == 0) return;
    std::vector<float> shifts(batch * channels);
    for (int64_t n = 0; n < batch; ++n)
        for (int64_t c = 0; c < channels; ++c) shifts[n * channels + c] = bf16_to_float(in_data[n * pixels * channels + c]);
    std::vector<double> sums(batch * blocks * channels * 2);  // (batch, block, channel, {sum, squares})
    at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
            const int64_t n = task / blocks, first = (task % blocks) * kPixelBlock;
            const int64_t last = std::min(pixels, first + kPixelBlock);
            double* destination = sums.data() + task * channels * 2;
            // kChunk channels at a time, their sums in registers, down the block's pixels
            for (int64_t c0 = 0; c0 < channels; c0 += kChunk) {
                __mmask16 valid[kChunkVectors];
                __m512 shift[kChunkVectors], s[kChunkVectors], q[kChunkVectors];
                for (int v = 0; v < kChunkVectors; ++v) {
                    valid[v] = c0 + 16 * v < channels ? first_lanes(channels - c0 - 16 * v) : 0;
                    shift[v] = _mm512_maskz_loadu_ps(valid[v], shifts.data() + n * channels + c0 + 16 * v);
                    s[v] = q[v] = _mm512_setzero_ps();
                }
                for (int64_t p = first; p < last; ++p) {
                    const uint16_t* row = in_data + (n * pixels + p) * channels + c0;
                    for (int v = 0; v < kChunkVectors; ++v) {
                        const __m512 x = _mm512_maskz_sub_ps(valid[v], load_bf16(row + 16 * v, valid[v]), shift[v]);
                        s[v] = _mm512_add_ps(s[v], x);
                        q[v] = _mm512_fmadd_ps(x, x, q[v]);
                    }
                }
                for (int v = 0; v < kChunkVectors; ++v) {
                    alignas(64) float s_lanes[16], q_lanes[16];
                    _mm512_store_ps(s_lanes, s[v]);
                    _mm512_store_ps(q_lanes, q[v]);
                    for (int64_t lane = 0; lane < 16 && c0 + 16 * v + lane < channels; ++lane) {
                        destination[2 * (c0 + 16 * v + lane)] = s_lanes[lane];
                        destination[2 * (c0 + 16 * v + lane) + 1] = q_lanes[lane];
                    }
                }
            }
        }
    });
    std::vector<float> scales(batch * channels), offsets(batch * channels);
    for (int64_t n = 0; n < batch; ++n) {
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t first_channel = g * per_group;
            const double group_shift = shifts[n * channels + first_channel];
            double total = 0.0, squares = 0.0;  // of x - group_shift over the group
            for (int64_t c = first_channel; c < first_channel + per_group; ++c) {
                double s = 0.0, q = 0.0;
                for (int64_t b = 0; b < blocks; ++b) {
                    s += sums[((n * blocks + b) * channels + c) * 2];
                    q += sums[((n * blocks + b) * channels + c) * 2 + 1];
                }
                const double d = shifts[n * channels + c] - group_shift;  // (x - k_c) + d = x - group_shift
                total += s + pixels * d;
                squares += q + 2.0 * d * s + pixels * d * d;
            }
            const double count = static_cast<double>(per_group * pixels), shifted_mean = total / count;
            const double mean = group_shift + shifted_mean;
            const double inverse_std = 1.0 / std::sqrt(std::max(0.0, squares / count - shifted_mean * shifted_mean) + eps);
            for (int64_t c = first_channel; c < first_channel + per_group; ++c) {
                scales[n * channels + c] = static_cast<float>(gamma[c] * inverse_std);
                offsets[n * channels + c] = static_cast<float>(beta[c] - mean * gamma[c] * inverse_std);
            }
        }
    }
    at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
            const int64_t n = task / blocks, first = (task % blocks) * kPixelBlock;
            const int64_t last = std::min(pixels, first + kPixelBlock);
            for (int64_t c0 = 0; c0 < channels; c0 += kChunk) {
                __mmask16 valid[kChunkVectors];
                __m512 scale[kChunkVectors], offset[kChunkVectors];
                for (int v = 0; v < kChunkVectors; ++v) {
                    valid[v] = c0 + 16 * v < channels ? first_lanes(channels - c0 - 16 * v) : 0;
                    scale[v] = _mm512_maskz_loadu_ps(valid[v], scales.data() + n * channels + c0 + 16 * v);
                    offset[v] = _mm512_maskz_loadu_ps(valid[v], offsets.data() + n * channels + c0 + 16 * v);
                }
                for (int64_t p = first; p < last; ++p) {
                    const uint16_t* source = in_data + (n * pixels + p) * channels + c0;
                    uint16_t* destination = out_data + (n * pixels + p) * channels + c0;
                    for (int v = 0; v < kChunkVectors; ++v) {
                        const __m512 y = _mm512_fmadd_ps(load_bf16(source + 16 * v, valid[v]), scale[v], offset[v]);
                        store_bf16(destination + 16 * v, activation(y, apply_silu), valid[v]);
                    }
                }
            }
        }
    });
}

at::Tensor group_norm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias, double eps,
                      bool apply_silu) {
    const bool nchw = x.is_contiguous();
    const bool nhwc = !nchw && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast);
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() >= 2 && (nchw || nhwc),
                "group_norm kernel: a bf16 (batch, channels, ...) tensor, contiguous or channels-last, expected");
    const int64_t channels = x.size(1);
    TORCH_CHECK(groups > 0 && channels % groups == 0 && weight.scalar_type() == at::kFloat &&
                bias.scalar_type() == at::kFloat && weight.numel() == channels && bias.numel() == channels &&
                weight.is_contiguous() && bias.is_contiguous(), "group_norm kernel: inconsistent arguments");
    at::Tensor out = at::empty_like(x);
    if (nchw)
        group_norm_nchw(x, groups, weight, bias, eps, apply_silu, out);
    else
        group_norm_nhwc(x, groups, weight, bias, eps, apply_silu, out);
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sdgen_kernels, m) {
    m.def("group_norm(Tensor x, int groups, Tensor weight, Tensor bias, float eps, bool silu) -> Tensor");
}

TORCH_LIBRARY_IMPL(sdgen_kernels, CPU, m) {
    m.impl("group_norm", &group_norm);
}
