// Attention for passes of 1 to 16 query rows (decoding steps and verify passes) on AVX-512 CPUs, float32, with
// grouped key/value heads: out[r, h*D + d] = sum_t softmax_t(scale * q[h, r] . k[g, t] + mask[r, t]) v[g, t, d],
// g = h / (H / KVH).
//
// Why our own kernel: a verify pass of 14 rows spends most of its extra time over a one-row step in attention,
// and torch's CPU flash attention computes it at a fraction of the float32 peak there (README, "Speed").
//
// Layout: the query rows of one KV head's query heads (H / KVH heads x R rows, "lanes") sit side by side in the 16
// lanes of a vector, so the scores of 16 lanes against one key are 16 in-order fused multiply-add chains over d,
// the softmax runs down the keys lane by lane, and the weighted sum of values keeps each lane's D outputs in
// registers. Every lane's result is a sum in an order fixed by the key count alone, so a row's bits do not depend
// on the other rows of the pass: a verify pass attends each row exactly as a one-row step does.
// ATen only, not torch/extension.h: the pybind11 and libtorch API headers take ~2/3 of a translation unit's
// compile time; panel_linear.cpp (the module definition) is the one that needs them
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace {

// exp for x <= 0 (scores minus their maximum) to about 1 ulp: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, p the
// degree-7 Taylor polynomial; below -87.3 (masked keys among them) exactly 0.
inline __m512 exp_nonpositive(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(~underflow), _mm512_scalef_ps(p, n));
}

struct Shape {
    int64_t heads, kv_heads, rows, keys, dim;
    int64_t q_head, q_row;     // strides of q [H, R, D] (the last dimension contiguous)
    int64_t k_head, k_row;     // strides of k [KVH, T, D]
    int64_t v_head, v_row;     // strides of v [KVH, T, D]
    float scale;
};

// Scores of one group of up to 16 lanes against keys [t0, t0 + KB): KB accumulators, one per key, each lane an
// in-order chain over d (KB independent chains hide the multiply-add latency).
template <int KB>
inline void score_keys(const float* qt, const float* k, const Shape& s, int64_t t0, float* out) {
    __m512 acc[KB];
    for (int i = 0; i < KB; ++i) acc[i] = _mm512_setzero_ps();
    const float* key[KB];
    for (int i = 0; i < KB; ++i) key[i] = k + (t0 + i) * s.k_row;
    for (int64_t d = 0; d < s.dim; ++d) {
        const __m512 q = _mm512_loadu_ps(qt + d * 16);
        for (int i = 0; i < KB; ++i) acc[i] = _mm512_fmadd_ps(q, _mm512_set1_ps(key[i][d]), acc[i]);
    }
    for (int i = 0; i < KB; ++i) _mm512_storeu_ps(out + (t0 + i) * 16, acc[i]);
}

// The weighted sum of values for lanes [l0, l0 + L) of a group: each lane's D outputs (DV vectors) in registers
// over all keys, in key order; p: the group's probabilities [T][16].
template <int L, int DV>
inline void weigh_values(const float* p, const float* v, const Shape& s, int l0, __m512 (&acc)[L][DV]) {
    for (int l = 0; l < L; ++l)
        for (int j = 0; j < DV; ++j) acc[l][j] = _mm512_setzero_ps();
    for (int64_t t = 0; t < s.keys; ++t) {
        const float* value = v + t * s.v_row;
        __m512 vv[DV];
        for (int j = 0; j < DV; ++j) vv[j] = _mm512_loadu_ps(value + j * 16);
        for (int l = 0; l < L; ++l) {
            const __m512 w = _mm512_set1_ps(p[t * 16 + l0 + l]);
            for (int j = 0; j < DV; ++j) acc[l][j] = _mm512_fmadd_ps(w, vv[j], acc[l][j]);
        }
    }
}

// One (KV head g, group of 16 lanes starting at lane `first`) item: scores, softmax down the keys, values.
template <int DV>
void attend_group(const float* q, const float* k, const float* v, const float* mask_t, float* out, const Shape& s,
                  int64_t g, int64_t first, std::vector<float>& work) {
    const int64_t groups = s.heads / s.kv_heads, lanes_total = groups * s.rows;
    const int lanes = static_cast<int>(std::min<int64_t>(16, lanes_total - first));
    work.resize(static_cast<size_t>(s.dim * 16 + s.keys * 16));
    float* qt = work.data();              // [D][16]: the lanes' queries, transposed
    float* scores = qt + s.dim * 16;      // [T][16]
    int lane_row[16] = {0};
    for (int l = 0; l < 16; ++l) {
        const int64_t lane = first + std::min(l, lanes - 1);  // dead lanes repeat the last live one (never stored)
        const int64_t h = g * groups + lane / s.rows, r = lane % s.rows;
        lane_row[l] = static_cast<int>(r);
        const float* row = q + h * s.q_head + r * s.q_row;
        for (int64_t d = 0; d < s.dim; ++d) qt[d * 16 + l] = row[d];
    }
    const float* kg = k + g * s.k_head;
    int64_t t = 0;
    for (; t + 8 <= s.keys; t += 8) score_keys<8>(qt, kg, s, t, scores);
    for (; t < s.keys; ++t) score_keys<1>(qt, kg, s, t, scores);
    // scale, mask, maximum
    const __m512 scale = _mm512_set1_ps(s.scale);
    const __m512i rows_of_lanes = _mm512_loadu_si512(lane_row);
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (t = 0; t < s.keys; ++t) {
        __m512 x = _mm512_mul_ps(_mm512_loadu_ps(scores + t * 16), scale);
        if (mask_t != nullptr) {  // mask_t [T][R]: this key's mask for every row, spread to the lanes' rows
            const __m512 m = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << s.rows) - 1), mask_t + t * s.rows);
            x = _mm512_add_ps(x, _mm512_permutexvar_ps(rows_of_lanes, m));
        }
        _mm512_storeu_ps(scores + t * 16, x);
        top = _mm512_max_ps(top, x);
    }
    __m512 total = _mm512_setzero_ps();
    for (t = 0; t < s.keys; ++t) {
        const __m512 p = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(scores + t * 16), top));
        _mm512_storeu_ps(scores + t * 16, p);
        total = _mm512_add_ps(total, p);
    }
    alignas(64) float sums[16];
    _mm512_store_ps(sums, total);
    constexpr int L = 16 / DV;  // lanes per pass: 16 accumulators and DV values in registers; L divides 16
    for (int l0 = 0; l0 < lanes; l0 += L) {
        __m512 acc[L][DV];
        weigh_values<L, DV>(scores, v + g * s.v_head, s, l0, acc);
        for (int l = l0; l < std::min(l0 + L, lanes); ++l) {
            const int64_t lane = first + l, h = g * groups + lane / s.rows, r = lane % s.rows;
            float* dst = out + r * s.heads * s.dim + h * s.dim;
            const __m512 inv = _mm512_set1_ps(sums[l]);
            for (int j = 0; j < DV; ++j) _mm512_storeu_ps(dst + j * 16, _mm512_div_ps(acc[l - l0][j], inv));
        }
    }
}

}  // namespace

namespace {

// One sequence's attention: its shape, its q [H, R, D], k and v [KVH, T, D], its mask_t [T, R] or null, and where
// its rows of the output start ([R, H * D], rows H * D floats apart).
struct Sequence {
    Shape s;
    const float *q, *k, *v, *mask;
    float* out;
};

// Every (sequence, KV head, group of 16 lanes) item on torch's threads, in one parallel region: a batch of
// sequences costs one fork and join per layer, not one per sequence. Each item computes what it computes alone,
// so a sequence's bits do not depend on the others.
void attend_sequences(const std::vector<Sequence>& sequences) {
    std::vector<std::pair<int64_t, int64_t>> items;  // (sequence, item of that sequence)
    for (size_t i = 0; i < sequences.size(); ++i) {
        const Shape& s = sequences[i].s;
        const int64_t per_head = (s.heads / s.kv_heads * s.rows + 15) / 16;
        for (int64_t item = 0; item < s.kv_heads * per_head; ++item) items.emplace_back(i, item);
    }
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t a, int64_t b) {
        std::vector<float> work;
        for (int64_t n = a; n < b; ++n) {
            const Sequence& q = sequences[static_cast<size_t>(items[n].first)];
            const int64_t per_head = (q.s.heads / q.s.kv_heads * q.s.rows + 15) / 16, item = items[n].second;
            const int64_t g = item / per_head, first = (item % per_head) * 16;
            if (q.s.dim == 64)
                attend_group<4>(q.q, q.k, q.v, q.mask, q.out, q.s, g, first, work);
            else
                attend_group<8>(q.q, q.k, q.v, q.mask, q.out, q.s, g, first, work);
        }
    });
}

// The checks of few_row_attention's arguments, and the Sequence they describe (its output not yet allocated).
Sequence describe(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& mask_t, double scale) {
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "few_row_attention: q, k, v must be 3-D");
    for (const auto* t : {&q, &k, &v})
        TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->stride(2) == 1,
                    "few_row_attention: q, k, v must be float32 CPU tensors with a contiguous last dimension");
    Shape s{q.size(0), k.size(0), q.size(1), k.size(1), q.size(2), q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), v.stride(0), v.stride(1), static_cast<float>(scale)};
    TORCH_CHECK(s.rows >= 1 && s.rows <= 16, "few_row_attention: 1 to 16 query rows, got ", s.rows);
    TORCH_CHECK(s.kv_heads >= 1 && s.heads % s.kv_heads == 0 && v.size(0) == s.kv_heads && v.size(1) == s.keys &&
                    k.size(2) == s.dim && v.size(2) == s.dim && s.keys >= 1,
                "few_row_attention: shapes q [H, R, D], k and v [KVH, T, D] with H a multiple of KVH");
    TORCH_CHECK(s.dim == 64 || s.dim == 128, "few_row_attention: head dimension 64 or 128, got ", s.dim);
    const float* mask = nullptr;
    if (mask_t.has_value() && mask_t->defined()) {
        TORCH_CHECK(mask_t->scalar_type() == at::kFloat && mask_t->is_contiguous() && mask_t->dim() == 2 &&
                        mask_t->size(0) == s.keys && mask_t->size(1) == s.rows,
                    "few_row_attention: mask_t must be a contiguous float32 [T, R] tensor");
        mask = mask_t->data_ptr<float>();
    }
    return Sequence{s, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), mask, nullptr};
}

}  // namespace

// q [H, R, D], k and v [KVH, T, D] (last dimension contiguous; cache views welcome), mask_t: None or the additive
// mask transposed, [T, R] contiguous. Returns [R, H * D], the layout the output projection reads.
at::Tensor few_row_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const c10::optional<at::Tensor>& mask_t, double scale) {
    Sequence sequence = describe(q, k, v, mask_t, scale);
    auto out = at::empty({sequence.s.rows, sequence.s.heads * sequence.s.dim}, q.options());
    sequence.out = out.data_ptr<float>();
    attend_sequences({sequence});
    return out;
}

namespace {

// One head's row rotated: out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[D/2:], x[:D/2]), each product
// and the sum rounded on its own (explicitly rounded instructions: the compiler cannot fuse them into a
// multiply-add), so the bits are those of transformers' apply_rotary_pos_emb in float32. D a multiple of 32.
inline void rotate_row(const float* x, const float* c, const float* sn, float* out, int64_t dim) {
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const int64_t half = dim / 2;
    const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));  // xor of the sign bit: AVX-512F only
    for (int64_t i = 0; i < half; i += 16) {
        const __m512 lo = _mm512_loadu_ps(x + i), hi = _mm512_loadu_ps(x + half + i);
        const __m512 neg_hi = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(hi), sign));
        _mm512_storeu_ps(out + i, _mm512_add_round_ps(
            _mm512_mul_round_ps(lo, _mm512_loadu_ps(c + i), kRound),
            _mm512_mul_round_ps(neg_hi, _mm512_loadu_ps(sn + i), kRound), kRound));
        _mm512_storeu_ps(out + half + i, _mm512_add_round_ps(
            _mm512_mul_round_ps(hi, _mm512_loadu_ps(c + half + i), kRound),
            _mm512_mul_round_ps(lo, _mm512_loadu_ps(sn + half + i), kRound), kRound));
    }
}

}  // namespace

namespace {

// rope_attend's checks of one sequence's arguments and its rotary + cache write: q [H, rows, D] rotated from qkv's
// query heads; keys rotated and values copied into the buffers at [start, start + rows). Returns q.
at::Tensor rotate_and_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& key_buffer, const at::Tensor& value_buffer, int64_t start, int64_t heads,
                            int64_t kv_heads) {
    TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.scalar_type() == at::kFloat && qkv.device().is_cpu(),
                "rope_attend: qkv must be a contiguous float32 CPU [rows, (H + 2 KVH) * D] tensor");
    const int64_t rows = qkv.size(0), dim = key_buffer.size(-1);
    TORCH_CHECK(heads >= 1 && kv_heads >= 1 && qkv.size(1) == (heads + 2 * kv_heads) * dim && dim % 32 == 0,
                "rope_attend: qkv's width is not (H + 2 KVH) * D with D a multiple of 32");
    for (const auto* t : {&cos, &sin})
        TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == rows &&
                        t->size(1) == dim,
                    "rope_attend: cos and sin must be contiguous float32 [rows, D] tensors");
    for (const auto* t : {&key_buffer, &value_buffer})
        TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == kv_heads &&
                        t->size(1) >= start + rows && t->size(2) == dim && t->stride(2) == 1 && start >= 0,
                    "rope_attend: key and value buffers must be float32 [KVH, capacity >= start + rows, D] with a "
                    "contiguous last dimension");
    auto q = at::empty({heads, rows, dim}, qkv.options());
    const float* src = qkv.data_ptr<float>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    float* qp = q.data_ptr<float>();
    float* kp = key_buffer.data_ptr<float>();
    float* vp = value_buffer.data_ptr<float>();
    const int64_t width = qkv.size(1);
    const int64_t ks0 = key_buffer.stride(0), ks1 = key_buffer.stride(1);
    const int64_t vs0 = value_buffer.stride(0), vs1 = value_buffer.stride(1);
    for (int64_t r = 0; r < rows; ++r) {
        const float* row = src + r * width;
        const float* c = cp + r * dim;
        const float* sn = sp + r * dim;
        for (int64_t h = 0; h < heads; ++h) rotate_row(row + h * dim, c, sn, qp + (h * rows + r) * dim, dim);
        for (int64_t g = 0; g < kv_heads; ++g) {
            rotate_row(row + (heads + g) * dim, c, sn, kp + g * ks0 + (start + r) * ks1, dim);
            std::copy_n(row + (heads + kv_heads + g) * dim, dim, vp + g * vs0 + (start + r) * vs1);
        }
    }
    return q;
}

// a cache layer's buffers carry a batch dimension of 1: [1, KVH, capacity, D]
at::Tensor unbatched(const at::Tensor& buffer) {
    return buffer.dim() == 4 && buffer.size(0) == 1 ? buffer.select(0, 0) : buffer;
}

}  // namespace

// A few-row pass's attention in one call, from the fused q|k|v projection: rotary embeddings on the query and key
// heads, the keys and values written into the cache's buffers at positions [start, start + R), and
// few_row_attention of the rotated queries over the cache's first start + R positions. What llama_forward.attend
// does in ~25 tensor operations per layer (rotary, the cache's update, the views), here without a tensor
// operation per step between them.
// qkv [R, (H + 2 KVH) * D] contiguous; cos, sin [R, D] contiguous; key_buffer, value_buffer [KVH, capacity, D]
// or [1, KVH, capacity, D] (the cache layer's buffers, last dimension contiguous, capacity >= start + R); mask_t as
// few_row_attention's.
at::Tensor rope_attend(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& keys,
                       const at::Tensor& values, int64_t start, int64_t heads, int64_t kv_heads,
                       const c10::optional<at::Tensor>& mask_t, double scale) {
    const at::Tensor key_buffer = unbatched(keys), value_buffer = unbatched(values);
    const at::Tensor q = rotate_and_store(qkv, cos, sin, key_buffer, value_buffer, start, heads, kv_heads);
    const int64_t rows = qkv.size(0);
    return few_row_attention(q, key_buffer.narrow(1, 0, start + rows), value_buffer.narrow(1, 0, start + rows),
                             mask_t, scale);
}

// rope_attend of several sequences in one call (a batched pass: sequence s holds rows [first_row[s],
// first_row[s + 1]) of qkv, cos and sin, its own cache buffers, start and mask_t), their attention in one parallel
// region -> [R, H * D]. Each sequence's rows get the bits rope_attend gives them alone.
at::Tensor rope_attend_batch(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                             const std::vector<int64_t>& first_row, const std::vector<at::Tensor>& keys,
                             const std::vector<at::Tensor>& values, const std::vector<int64_t>& starts,
                             const std::vector<c10::optional<at::Tensor>>& masks, int64_t heads, int64_t kv_heads,
                             double scale) {
    const size_t count = keys.size();
    TORCH_CHECK(count >= 1 && first_row.size() == count + 1 && values.size() == count && starts.size() == count &&
                    masks.size() == count && first_row[count] == qkv.size(0),
                "rope_attend_batch: one buffer pair, start and mask per sequence, rows adding up to qkv's");
    auto out = at::empty({qkv.size(0), heads * unbatched(keys[0]).size(-1)}, qkv.options());
    std::vector<at::Tensor> held;  // the queries and cache views the sequences' pointers read
    std::vector<Sequence> sequences;
    for (size_t i = 0; i < count; ++i) {
        const int64_t r0 = first_row[i], rows = first_row[i + 1] - r0;
        const at::Tensor key_buffer = unbatched(keys[i]), value_buffer = unbatched(values[i]);
        const at::Tensor q = rotate_and_store(qkv.narrow(0, r0, rows), cos.narrow(0, r0, rows),
                                              sin.narrow(0, r0, rows), key_buffer, value_buffer, starts[i], heads,
                                              kv_heads);
        const at::Tensor k = key_buffer.narrow(1, 0, starts[i] + rows), v = value_buffer.narrow(1, 0, starts[i] + rows);
        Sequence sequence = describe(q, k, v, masks[i], scale);
        sequence.out = out.data_ptr<float>() + r0 * out.size(1);
        sequences.push_back(sequence);
        held.insert(held.end(), {q, k, v});
    }
    attend_sequences(sequences);
    return out;
}
