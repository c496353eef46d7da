// Dynamic per-tensor quantization of bf16 activations to uint8 for oneDNN's int8 matrix products.
//
// Why: the int8 path quantizes every convolution's and linear layer's input at each call.
// PyTorch's way (aminmax, a float copy, quantize_per_tensor, int_repr) makes four trips through
// memory and costs about a tenth of the int8 product it feeds; here it is two reads and one
// write of one byte per value.
//
// Affine over the range [min(x, 0), max(x, 0)] (zero exactly representable, as oneDNN's zero
// points need): scale = (hi - lo) / 255, zero_point = round(-lo / scale), q = clamp(round(x /
// scale) + zero_point, 0, 255), rounding to nearest even. The output has the input's sizes and
// strides (contiguous or channels-last), since the quantization is elementwise. An input holding
// inf or NaN gives scale NaN (and no values): the caller computes that product another way, so
// that the non-finite values propagate as they would without int8.

#include "vector_math.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using namespace sdgen_kernels;

constexpr int64_t kGrain = 1 << 16;  // values per task: large enough to amortise the scheduling

std::tuple<at::Tensor, double, int64_t> quantize_u8(const at::Tensor& x) {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.numel() > 0 &&
                (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)),
                "quantize_u8 kernel: a non-empty contiguous (or channels-last) bf16 tensor expected");
    const int64_t count = x.numel();
    const auto* source = reinterpret_cast<const uint16_t*>(x.data_ptr());

    const int64_t tasks = (count + kGrain - 1) / kGrain;
    std::vector<float> lows(tasks, 0.0f), highs(tasks, 0.0f);
    std::vector<char> non_finite(tasks, 0);
    at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
        for (int64_t task = first; task < last; ++task) {
            const int64_t begin = task * kGrain, end = std::min(count, begin + kGrain);
            __m512 low = _mm512_setzero_ps(), high = _mm512_setzero_ps();  // the range always holds 0
            __mmask16 bad = 0;
            for (int64_t i = begin; i < end; i += 16) {
                const __mmask16 valid = first_lanes(end - i);
                const __m512 values = load_bf16(source + i, valid);  // masked-off lanes read as 0
                low = _mm512_min_ps(low, values);
                high = _mm512_max_ps(high, values);
                // x - x is 0 for finite x and NaN for inf and NaN (min and max would drop a NaN)
                bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(values, values), _mm512_setzero_ps(), _CMP_NEQ_UQ);
            }
            lows[task] = _mm512_reduce_min_ps(low);
            highs[task] = _mm512_reduce_max_ps(high);
            non_finite[task] = bad != 0;
        }
    });
    if (std::find(non_finite.begin(), non_finite.end(), 1) != non_finite.end()) {
        return {at::empty({0}, x.options().dtype(at::kByte)), std::numeric_limits<double>::quiet_NaN(), 0};
    }
    const float low = *std::min_element(lows.begin(), lows.end());
    const float high = *std::max_element(highs.begin(), highs.end());
    const double scale = high > low ? (static_cast<double>(high) - low) / 255.0 : 1.0;
    const int64_t zero_point = std::clamp<int64_t>(std::llround(-low / scale), 0, 255);

    at::Tensor out = at::empty_like(x, x.options().dtype(at::kByte));
    auto* destination = out.data_ptr<uint8_t>();
    const __m512 inverse = _mm512_set1_ps(static_cast<float>(1.0 / scale));
    const __m512i zero = _mm512_set1_epi32(static_cast<int32_t>(zero_point));
    at::parallel_for(0, count, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; i += 16) {
            const __mmask16 valid = first_lanes(end - i);
            const __m512i rounded = _mm512_cvtps_epi32(_mm512_mul_ps(load_bf16(source + i, valid), inverse));
            const __m512i shifted = _mm512_max_epi32(_mm512_add_epi32(rounded, zero), _mm512_setzero_si512());
            _mm512_mask_cvtusepi32_storeu_epi8(destination + i, valid, shifted);  // saturates above 255
        }
    });
    return {out, scale, zero_point};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sdgen_kernels, m) {
    m.def("quantize_u8(Tensor x) -> (Tensor, float, int)");
}

TORCH_LIBRARY_IMPL(sdgen_kernels, CPU, m) {
    m.impl("quantize_u8", &quantize_u8);
}
