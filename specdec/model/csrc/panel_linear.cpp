// A float32 linear layer for few-row inputs on AVX-512 CPUs: y[m, n] = sum_k x[m, k] * W[n, k].
//
// Why our own kernel: a decoding step multiplies 1 to 16 rows by every weight matrix, and on a 2-core AMD EPYC
// oneDNN's pre-packed kernels reach neither the memory bandwidth (1 row) nor the float32 peak (8-16 rows) there;
// this kernel streams the weights once per call and keeps every row's accumulators in registers (the README's
// "Speed" section has the measurements). Weights are packed in panels of 16 output features, [N/16][K][16], so one
// 64-byte load feeds one fused multiply-add per input row.
//
// Every output element is one accumulator updated in order k = 0..K-1, whatever the number of rows or which tile
// computes it: a row's result does not depend on the other rows of the call (batch-invariant), so a verify pass
// multiplies each row exactly as a one-row step does.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

template <int M, int NB>
inline void tile(const float* __restrict x, int64_t K, const float* __restrict packed, float* __restrict y,
                 int64_t N, int64_t p0) {
    __m512 acc[M][NB];
    for (int m = 0; m < M; ++m)
        for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
    const float* panel[NB];
    for (int b = 0; b < NB; ++b) panel[b] = packed + (p0 + b) * K * 16;
    for (int64_t k = 0; k < K; ++k) {
        __m512 w[NB];
        for (int b = 0; b < NB; ++b) {
            w[b] = _mm512_loadu_ps(panel[b] + k * 16);
            // 4 KiB ahead in the same panel: the hardware prefetcher alone leaves bandwidth unused at one row
            _mm_prefetch(reinterpret_cast<const char*>(panel[b] + k * 16 + 1024), _MM_HINT_T0);
        }
        for (int m = 0; m < M; ++m) {
            const __m512 xv = _mm512_set1_ps(x[m * K + k]);
            for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_fmadd_ps(xv, w[b], acc[m][b]);
        }
    }
    for (int m = 0; m < M; ++m)
        for (int b = 0; b < NB; ++b) _mm512_storeu_ps(y + m * N + (p0 + b) * 16, acc[m][b]);
}

// Panels [pa, pb) for M rows; NB panels per tile so that M * NB accumulators and NB weights fit 32 registers.
template <int M>
void rows(const float* x, int64_t K, const float* packed, float* y, int64_t N, int64_t pa, int64_t pb) {
    constexpr int NB = M <= 5 ? 4 : (M <= 8 ? 3 : (M <= 13 ? 2 : 1));
    int64_t p = pa;
    for (; p + NB <= pb; p += NB) tile<M, NB>(x, K, packed, y, N, p);
    for (; p < pb; ++p) tile<M, 1>(x, K, packed, y, N, p);
}

using RowsFn = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t, int64_t);
constexpr RowsFn kRows[17] = {nullptr,  rows<1>,  rows<2>,  rows<3>,  rows<4>,  rows<5>,  rows<6>,
                              rows<7>,  rows<8>,  rows<9>,  rows<10>, rows<11>, rows<12>, rows<13>,
                              rows<14>, rows<15>, rows<16>};

}  // namespace

torch::Tensor panel_linear(torch::Tensor x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
                "panel_linear: x must be a 2-D float32 CPU tensor");
    x = x.contiguous();
    TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 16 && packed.scalar_type() == torch::kFloat32 &&
                    packed.is_contiguous() && packed.size(1) == x.size(1),
                "panel_linear: packed must be a contiguous float32 [N/16, K, 16] tensor with K = x.size(1)");
    const int64_t M = x.size(0), K = x.size(1), panels = packed.size(0), N = panels * 16;
    auto y = torch::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    const float* wp = packed.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    // Up to 16 rows (steps and verify passes) in one tile row; longer inputs (prompts) 8 rows at a time with 3
    // panels per tile, which needs fewer loads per multiply-add (measured: a 300-row prompt as fast as oneDNN).
    const int64_t chunk = M <= 16 ? M : 8;
    // Threads split the panels (each streams its own part of the weights). A prompt's rows go chunk by chunk over
    // a group of 6 panels before the next group, so they reuse those panels from cache instead of reading the
    // weights again for every chunk.
    at::parallel_for(0, panels, 6, [&](int64_t pa, int64_t pb) {
        for (int64_t g = pa; g < pb; g += 6) {
            const int64_t ge = std::min<int64_t>(g + 6, pb);
            for (int64_t m0 = 0; m0 < M; m0 += chunk) {
                const int64_t rows_here = std::min<int64_t>(chunk, M - m0);
                kRows[rows_here](xp + m0 * K, K, wp, yp + m0 * N, N, g, ge);
            }
        }
    });
    if (bias.has_value() && bias->defined()) y.add_(*bias);
    return y;
}

// rms_norm.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
// swiglu.cpp
at::Tensor swiglu(const at::Tensor& gate_up, int64_t intermediate);
// row_select.cpp
at::Tensor argmax_rows(at::Tensor x);
std::tuple<at::Tensor, at::Tensor> top_k_rows(at::Tensor x, int64_t k);
// few_row_attention.cpp
torch::Tensor few_row_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const c10::optional<torch::Tensor>& mask_t, double scale);
torch::Tensor rope_attend(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                          const torch::Tensor& key_buffer, const torch::Tensor& value_buffer, int64_t start,
                          int64_t heads, int64_t kv_heads, const c10::optional<torch::Tensor>& mask_t, double scale);

// quant_linear.cpp
torch::Tensor int8_linear(torch::Tensor x, const torch::Tensor& packed, const torch::Tensor& col_sums,
                          const torch::Tensor& scales, int64_t N);
torch::Tensor int4_linear(torch::Tensor x, const torch::Tensor& packed, const torch::Tensor& scales_zeros,
                          int64_t group);
bool quant_amx(bool want);
// decoder_layers.cpp
at::Tensor decoder_layers(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                          const std::vector<int64_t>& segment_rows, const std::vector<at::Tensor>& keys,
                          const std::vector<at::Tensor>& values, const std::vector<int64_t>& starts,
                          const std::vector<at::Tensor>& masks, const std::vector<at::Tensor>& tensors,
                          const std::vector<int64_t>& ints, const std::vector<double>& eps, int64_t heads,
                          int64_t kv_heads, int64_t intermediate, double scale);
// machine_probe.cpp
int64_t probe_read(const torch::Tensor& buffer);
double probe_compute(int64_t iterations, bool vnni);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("panel_linear", &panel_linear, "float32 linear on panel-packed weights (AVX-512)");
    m.def("int8_linear", &int8_linear, "int8 linear of 1-64+ rows, per-row int8 activations (AVX-512 VNNI)");
    m.def("int4_linear", &int4_linear, "int4 linear of 1-64+ rows, per-row int8 activations (AVX-512 VNNI)");
    m.def("quant_amx", &quant_amx, "AMX tiles on (where the CPU and Linux allow them) or off for int8 passes of 4+ "
          "rows and int4 passes of 13+; returns whether on");
    m.def("probe_read", &probe_read, "streaming read of a buffer on torch's threads (a checksum)");
    m.def("probe_compute", &probe_compute, "float32 FMA or int8 VNNI loop on each of torch's threads (a checksum)");
    m.def("few_row_attention", &few_row_attention, "float32 attention of 1-16 query rows, grouped KV heads (AVX-512)");
    m.def("rms_norm", &rms_norm, "RMSNorm of float32 rows with torch.rms_norm's bits, one call (AVX-512)");
    m.def("swiglu", &swiglu, "silu(gate) * up of float32 rows with torch's bits, one call (AVX-512)");
    m.def("argmax_rows", &argmax_rows, "torch.argmax of each float32 row, one call (AVX-512)");
    m.def("top_k_rows", &top_k_rows, "each float32 row's k largest, best first, one call (AVX-512)");
    m.def("decoder_layers", &decoder_layers, "a few-row pass's decoder layers in one call (llama_forward's loop, same "
          "kernels and bits)");
    m.def("rope_attend", &rope_attend, "rotary + cache write + few_row_attention of a few-row pass (AVX-512)");
}
