// Each row's argmax and top k of float32 logits on AVX-512 CPUs, in one call for all rows.
//
// Why: torch's CPU reductions that return an index are slow over one long row: argmax of one row of SmolLM2's
// 49,152 logits takes ~73 us with 2 threads (2-core Xeon), a full percent of an int4 step of ~6 ms, and greedy
// decoding takes one per emitted token (a verify pass one per row on its accepted path). A vector scan takes ~4 us.
//
// argmax_rows: torch.argmax's answer per row: the first index of the largest value; a row with a NaN gives the
// first NaN's index (torch orders NaN above every number).
// top_k_rows: the k largest values per row, best first, equal values in index order (torch.topk's values exactly;
// among equal values torch leaves the order open). One pass per row keeps the k best seen so far, sorted, and the
// vector compare skips every block of 16 whose entries are all below the k-th best. A row with a NaN is not handled
// here: the call returns an empty tensor pair and the Python side asks torch.topk (which orders NaN first).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

int64_t first_nan(const float* row, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        if (std::isnan(row[i])) return i;
    return -1;
}

int64_t row_argmax(const float* row, int64_t n) {
    __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __mmask16 nan = 0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(row + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        best = _mm512_max_ps(best, v);
    }
    float top = _mm512_reduce_max_ps(best);
    bool has_nan = nan != 0;
    for (int64_t j = i; j < n; ++j) {
        has_nan |= std::isnan(row[j]);
        if (row[j] > top) top = row[j];
    }
    if (has_nan) return first_nan(row, n);
    const __m512 wanted = _mm512_set1_ps(top);
    for (i = 0; i + 16 <= n; i += 16) {
        const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + i), wanted, _CMP_EQ_OQ);
        if (hit) return i + __builtin_ctz(hit);
    }
    for (; i < n; ++i)
        if (row[i] == top) return i;
    return 0;  // n == 0 is refused before; an all -inf row matches above
}

// The k best of one row, best first, into values/indices; false if the row holds a NaN.
bool row_top_k(const float* row, int64_t n, int64_t k, float* values, int64_t* indices) {
    int64_t held = 0;
    float floor = -std::numeric_limits<float>::infinity();  // the k-th best once k are held
    auto offer = [&](float v, int64_t at) {
        if (held == k && !(v > floor)) return;  // equal to the k-th best: the earlier index stays
        int64_t j = held < k ? held++ : k - 1;
        while (j > 0 && values[j - 1] < v) {    // after equal values: they came first
            values[j] = values[j - 1];
            indices[j] = indices[j - 1];
            --j;
        }
        values[j] = v;
        indices[j] = at;
        if (held == k) floor = values[k - 1];
    };
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(row + i);
        if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) return false;
        // until k are held every entry is a candidate (-inf included: a row may be all -inf)
        __mmask16 hit = held < k ? static_cast<__mmask16>(0xFFFF)
                                 : _mm512_cmp_ps_mask(v, _mm512_set1_ps(floor), _CMP_GT_OQ);
        while (hit) {
            const int lane = __builtin_ctz(hit);
            offer(row[i + lane], i + lane);
            hit &= hit - 1;
        }
    }
    for (; i < n; ++i) {
        if (std::isnan(row[i])) return false;
        offer(row[i], i);
    }
    return true;
}

void check_rows(const at::Tensor& x, const char* name) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.size(1) > 0, name,
                ": x must be a 2-D float32 CPU tensor with at least one column");
}

}  // namespace

// x [rows, n] float32 -> int64 [rows]: torch.argmax(x, dim=-1).
at::Tensor argmax_rows(at::Tensor x) {
    check_rows(x, "argmax_rows");
    x = x.contiguous();
    const int64_t rows = x.size(0), n = x.size(1);
    auto out = at::empty({rows}, x.options().dtype(at::kLong));
    const float* xp = x.data_ptr<float>();
    int64_t* op = out.data_ptr<int64_t>();
    // one row is ~4 us: threads pay only for many rows
    at::parallel_for(0, rows, 8, [&](int64_t a, int64_t b) {
        for (int64_t r = a; r < b; ++r) op[r] = row_argmax(xp + r * n, n);
    });
    return out;
}

// x [rows, n] float32, 1 <= k <= n -> (values [rows, k] float32, indices [rows, k] int64), best first; two empty
// tensors where a row holds a NaN (the caller then uses torch.topk).
std::tuple<at::Tensor, at::Tensor> top_k_rows(at::Tensor x, int64_t k) {
    check_rows(x, "top_k_rows");
    TORCH_CHECK(k >= 1 && k <= x.size(1), "top_k_rows: k must be between 1 and the row length");
    x = x.contiguous();
    const int64_t rows = x.size(0), n = x.size(1);
    auto values = at::empty({rows, k}, x.options());
    auto indices = at::empty({rows, k}, x.options().dtype(at::kLong));
    const float* xp = x.data_ptr<float>();
    float* vp = values.data_ptr<float>();
    int64_t* ip = indices.data_ptr<int64_t>();
    std::vector<char> ok(rows, 1);
    at::parallel_for(0, rows, 8, [&](int64_t a, int64_t b) {
        for (int64_t r = a; r < b; ++r) ok[r] = row_top_k(xp + r * n, n, k, vp + r * k, ip + r * k);
    });
    for (char row_ok : ok)
        if (!row_ok) return {at::empty({0}, x.options()), at::empty({0}, x.options().dtype(at::kLong))};
    return {values, indices};
}
