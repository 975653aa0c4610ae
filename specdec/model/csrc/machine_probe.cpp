// The machine's limits on the threads torch uses (specdec/measure/machine.py times these calls): a streaming read
// of a buffer far larger than the caches, and register-resident float32 fused multiply-add and int8 VNNI
// (vpdpbusd) loops, each thread on its own independent chains so only the execution units bound the rate.
// ATen only, not torch/extension.h: the pybind11 and libtorch API headers take ~2/3 of a translation unit's
// compile time; panel_linear.cpp (the module definition) is the one that needs them
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,fma")

namespace {
constexpr int kChains = 16;  // independent accumulators: more than latency x throughput of either instruction

int64_t read_part(const uint8_t* p, int64_t bytes) {
    __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                      _mm512_setzero_si512()};
    for (int64_t i = 0; i + 256 <= bytes; i += 256)
        for (int j = 0; j < 4; ++j)
            acc[j] = _mm512_add_epi64(acc[j], _mm512_loadu_si512(p + i + 64 * j));
    acc[0] = _mm512_add_epi64(_mm512_add_epi64(acc[0], acc[1]), _mm512_add_epi64(acc[2], acc[3]));
    return _mm512_reduce_add_epi64(acc[0]);
}

double fma_part(int64_t iterations) {
    __m512 acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(1.0f + c * 1e-3f);
    const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
    for (int64_t i = 0; i < iterations; ++i)
        for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
    float sum = 0;
    for (int c = 0; c < kChains; ++c) sum += _mm512_reduce_add_ps(acc[c]);
    return sum;
}

double vnni_part(int64_t iterations) {
    __m512i acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_epi32(c);
    const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
    for (int64_t i = 0; i < iterations; ++i)
        for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbusd_epi32(acc[c], a, b);
    int64_t sum = 0;
    for (int c = 0; c < kChains; ++c) sum += _mm512_reduce_add_epi32(acc[c]);
    return static_cast<double>(sum);
}
}  // namespace

// Sums a uint8 buffer as int64 lanes, the threads splitting it (returns the sum so nothing is optimised away).
int64_t probe_read(const at::Tensor& buffer) {
    TORCH_CHECK(buffer.scalar_type() == at::kByte && buffer.is_contiguous(),
                "probe_read: the buffer must be contiguous uint8");
    const uint8_t* p = buffer.data_ptr<uint8_t>();
    const int64_t blocks = buffer.numel() / (1 << 20);
    std::atomic<int64_t> total{0};
    at::parallel_for(0, blocks, 1, [&](int64_t a, int64_t b) {
        total += read_part(p + (a << 20), (b - a) << 20);
    });
    return total.load();
}

// Each of torch's threads runs `iterations` x 16 vector instructions (fma: 16 x 2 float32 operations each; vnni:
// 64 x 2 int8 operations each); returns a checksum.
double probe_compute(int64_t iterations, bool vnni) {
    const int64_t threads = at::get_num_threads();
    std::vector<double> sums(threads);
    at::parallel_for(0, threads, 1, [&](int64_t a, int64_t b) {
        for (int64_t t = a; t < b; ++t) sums[t] = vnni ? vnni_part(iterations) : fma_part(iterations);
    });
    double s = 0;
    for (double v : sums) s += v;
    return s;
}

#pragma GCC pop_options
