// RMSNorm of float32 rows with the bits of torch.rms_norm on AVX-512 CPUs (ATen's CPU capability AVX512), in one
// call instead of torch's ~10 operators (pow, mean = sum + div, add, rsqrt, two multiplies, casts): ~10 us a call
// from Python, 61 calls a step in SmolLM2-135M, more than half a millisecond of an int4 step of ~8 ms.
//
// The same operations in the same order as torch's composite (aten::_fused_rms_norm for float32 input and weight):
//   mean = sum(x * x) / n   (ATen's cascade_sum over the row: 8-float vectors — its sum kernel runs on AVX2 vectors
//                            even where the CPU capability is AVX512 — 4 accumulators interleaved, their levels
//                            folded every 16 groups, then the scalar tail, then the 8 lanes in order)
//   r    = 1 / sqrt(mean + eps)
//   y    = (x * r) * w
// Every step is one IEEE operation: the squares are computed with explicitly rounded instructions into a buffer
// first, as torch materialises pow(x, 2), so the compiler cannot fuse a square and its sum into a multiply-add
// (GCC contracts plain vector multiplies and adds), and the result equals torch's bit for bit; the Python
// side (kernels.rms_norm_matches, kernels.rms_norm_fits) checks that on this machine before our forward uses it,
// since a later torch could change its order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int kLanes = 8;   // floats per vector of ATen's sum kernel (found by comparing bits: 16 lanes differ)
constexpr int kIlp = 4;     // SumKernel.cpp's row_sum: the row read as groups of 4 vectors
constexpr int kLevels = 4;  // multi_row_sum's cascade levels

int ceil_log2(int64_t x) {  // c10's CeilLog2 as SumKernel uses it (1 for x <= 2)
    if (x <= 2) return 1;
    int bits = 0;
    for (uint64_t v = static_cast<uint64_t>(x) - 1; v; v >>= 1) ++bits;
    return bits;
}

constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// squares[e] = x[e] * x[e], each product rounded on its own
void square(const float* x, float* squares, int64_t n) {
    int64_t e = 0;
    for (; e + 16 <= n; e += 16) {
        const __m512 v = _mm512_loadu_ps(x + e);
        _mm512_storeu_ps(squares + e, _mm512_mul_round_ps(v, v, kRound));
    }
    for (; e < n; ++e) squares[e] = x[e] * x[e];  // a product stored: nothing to fuse it with
}

// the sum of a row of squares in cascade_sum's order (vectorized_inner_sum -> row_sum -> multi_row_sum): adds only
float cascade_sum(const float* x, int64_t n) {
    const int64_t vectors = n / kLanes, groups = vectors / kIlp;
    const int64_t level_power = std::max<int64_t>(4, ceil_log2(groups) / kLevels);
    const int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
    __m256 acc[kLevels][kIlp];
    for (auto& level : acc)
        for (auto& a : level) a = _mm256_setzero_ps();
    auto load = [&](int64_t vector) { return _mm256_loadu_ps(x + vector * kLanes); };
    int64_t i = 0;
    while (i + level_step <= groups) {
        for (int64_t j = 0; j < level_step; ++j, ++i)
            for (int k = 0; k < kIlp; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], load(i * kIlp + k));
        for (int j = 1; j < kLevels; ++j) {
            for (int k = 0; k < kIlp; ++k) {
                acc[j][k] = _mm256_add_ps(acc[j][k], acc[j - 1][k]);
                acc[j - 1][k] = _mm256_setzero_ps();
            }
            if ((i & (level_mask << (j * level_power))) != 0) break;
        }
    }
    for (; i < groups; ++i)
        for (int k = 0; k < kIlp; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], load(i * kIlp + k));
    for (int j = 1; j < kLevels; ++j)
        for (int k = 0; k < kIlp; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], acc[j][k]);
    __m256 total = acc[0][0];
    for (int64_t v = groups * kIlp; v < vectors; ++v) total = _mm256_add_ps(total, load(v));  // row_sum's tail
    for (int k = 1; k < kIlp; ++k) total = _mm256_add_ps(total, acc[0][k]);
    float sum = 0.0f;
    for (int64_t e = vectors * kLanes; e < n; ++e) sum += x[e];  // the scalar tail first
    alignas(32) float lanes[kLanes];
    _mm256_store_ps(lanes, total);
    for (float lane : lanes) sum += lane;
    return sum;
}

}  // namespace

// x [rows, n] float32 (rows contiguous in the last dimension), weight [n] float32 -> [rows, n]
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "rms_norm: x must be [rows, n] "
                "float32 with contiguous rows");
    TORCH_CHECK(weight.dim() == 1 && weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                weight.size(0) == x.size(1), "rms_norm: weight must be a contiguous float32 [n]");
    const int64_t rows = x.size(0), n = x.size(1), stride = x.stride(0);
    at::Tensor out = at::empty({rows, n}, x.options());
    const float* xs = x.data_ptr<float>();
    const float* w = weight.data_ptr<float>();
    float* ys = out.data_ptr<float>();
    const float epsilon = static_cast<float>(eps), count = static_cast<float>(n);
    // rows are independent (one row's bits never depend on another's); small passes stay on this thread
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        std::vector<float> squares(n);
        for (int64_t r = begin; r < end; ++r) {
            const float* row = xs + r * stride;
            float* y = ys + r * n;
            square(row, squares.data(), n);
            const float mean = cascade_sum(squares.data(), n) / count;
            const float inv = 1.0f / std::sqrt(mean + epsilon);
            const __m512 scale = _mm512_set1_ps(inv);
            int64_t e = 0;
            for (; e + 16 <= n; e += 16)
                _mm512_storeu_ps(y + e, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(row + e), scale),
                                                      _mm512_loadu_ps(w + e)));
            for (; e < n; ++e) y[e] = (row[e] * inv) * w[e];
        }
    });
    return out;
}
