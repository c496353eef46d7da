// The GEGLU of SD's transformer feed-forward (Shazeer 2020), value * gelu(gate), in one pass.
//
// Why: PyTorch computes gelu(gate) into a new bf16 tensor and multiplies in a second pass, two
// roundings and three trips through memory; here each output element reads its value and gate
// once, is computed in fp32 and rounded to bf16 once.
//
// Input (rows, 2 * inner) bf16, the projection's output: values in the first half of each row,
// gates in the second (as torch.chunk(2, -1) splits it). Output (rows, inner) bf16.

#include "vector_math.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

using namespace sdgen_kernels;

at::Tensor geglu(const at::Tensor& projected) {
    TORCH_CHECK(projected.scalar_type() == at::kBFloat16 && projected.is_contiguous() && projected.dim() >= 1 &&
                projected.size(-1) % 2 == 0, "geglu kernel: a contiguous bf16 tensor with an even last size expected");
    const int64_t inner = projected.size(-1) / 2, rows = projected.numel() / (2 * inner);
    std::vector<int64_t> shape = projected.sizes().vec();
    shape.back() = inner;
    at::Tensor out = at::empty(shape, projected.options());
    const auto* in_data = reinterpret_cast<const uint16_t*>(projected.data_ptr());
    auto* out_data = reinterpret_cast<uint16_t*>(out.data_ptr());
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(inner, 1)), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
            const uint16_t* value = in_data + row * 2 * inner;
            const uint16_t* gate = value + inner;
            uint16_t* destination = out_data + row * inner;
            for (int64_t i = 0; i < inner; i += 16) {
                const __mmask16 valid = first_lanes(inner - i);
                store_bf16(destination + i, _mm512_mul_ps(load_bf16(value + i, valid), gelu(load_bf16(gate + i, valid))),
                           valid);
            }
        }
    });
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sdgen_kernels, m) {
    m.def("geglu(Tensor projected) -> Tensor");
}

TORCH_LIBRARY_IMPL(sdgen_kernels, CPU, m) {
    m.impl("geglu", &geglu);
}
