// The decoder layers of a few-row pass (decoding steps and verify passes of 1 to 16 rows, of one sequence or of a
// batch of sequences each over its own cache) as one call: for each
// layer, RMSNorm, the fused q|k|v projection, rope_attend (rotary, the cache write, few-row attention), the output
// projection and its residual add, RMSNorm, the gate|up projection, SiLU times up, the down projection and its
// residual add.
//
// Why: llama_forward.forward_batch issues these as ~10 Python-level calls a layer, and on a 2-core Xeon the Python
// and pybind11 between them were ~0.8-1 ms of a ~4.8 ms int4 step of SmolLM2-135M (30 layers), more than the
// attention kernel. Here the same kernels are called from C++ with the same arguments in the same order, so every
// bit is the Python loop's (tests/test_llama_forward.py compares logits and caches); the residual adds are torch's
// add, in place after the first (x + y and x.add_(y) round alike).
//
// The layers' weights arrive flattened (llama_forward.native_layers), read with a cursor per layer:
//   tensors: attn_norm, mlp_norm, then for each of the 4 projections (qkv, out, gate_up, down) 3 tensors per part;
//   ints:    for each projection its number of parts, then (kind, parameter) per part;
//   eps:     attn_eps, mlp_eps.
// A projection of several parts (float32 q, k and v as separate panel matrices) concatenates their outputs, as
// llama_forward.concatenated does. Kinds: 0 panel_linear (packed), 1 int8_linear (packed, column sums, scales;
// parameter: output features), 2 int4_linear (packed, scales and zeros; parameter: group size).
// ATen only (see few_row_attention.cpp); the module definition is in panel_linear.cpp.
#include <ATen/ATen.h>

#include <vector>

at::Tensor panel_linear(at::Tensor x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias);
at::Tensor int8_linear(at::Tensor x, const at::Tensor& packed, const at::Tensor& col_sums, const at::Tensor& scales,
                       int64_t N);
at::Tensor int4_linear(at::Tensor x, const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t group);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor swiglu(const at::Tensor& gate_up, int64_t intermediate);
at::Tensor rope_attend_batch(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                             const std::vector<int64_t>& first_row, const std::vector<at::Tensor>& keys,
                             const std::vector<at::Tensor>& values, const std::vector<int64_t>& starts,
                             const std::vector<c10::optional<at::Tensor>>& masks, int64_t heads, int64_t kv_heads,
                             double scale);

namespace {

struct Cursor {
    const std::vector<at::Tensor>& tensors;
    const std::vector<int64_t>& ints;
    size_t t = 0, i = 0;

    const at::Tensor& tensor() {
        TORCH_CHECK(t < tensors.size(), "decoder_layers: the weights list ends early");
        return tensors[t++];
    }
    int64_t integer() {
        TORCH_CHECK(i < ints.size(), "decoder_layers: the layout list ends early");
        return ints[i++];
    }
};

at::Tensor projection(const at::Tensor& x, Cursor& c) {
    const int64_t parts = c.integer();
    TORCH_CHECK(parts >= 1, "decoder_layers: a projection needs at least one part");
    std::vector<at::Tensor> outputs;
    outputs.reserve(static_cast<size_t>(parts));
    for (int64_t p = 0; p < parts; ++p) {
        const int64_t kind = c.integer(), parameter = c.integer();
        const at::Tensor& a = c.tensor();
        const at::Tensor& b = c.tensor();
        const at::Tensor& d = c.tensor();
        if (kind == 0)
            outputs.push_back(panel_linear(x, a, c10::nullopt));
        else if (kind == 1)
            outputs.push_back(int8_linear(x, a, b, d, parameter));
        else if (kind == 2)
            outputs.push_back(int4_linear(x, a, b, parameter));
        else
            TORCH_CHECK(false, "decoder_layers: unknown projection kind ", kind);
    }
    return parts == 1 ? outputs[0] : at::cat(outputs, 1);
}

}  // namespace

// x [R, hidden] float32 (not modified; the layers' output is returned): the rows of S sequences one after another,
// segment_rows[s] of sequence s; cos, sin [R, D]. For sequence s and layer l (index s * layers + l): keys, values
// the cache layer's buffers ([1, KVH, capacity, D]) with room for positions [starts[i], starts[i] + rows);
// masks[s]: the sequence's mask_t as rope_attend takes it, or an empty tensor for none.
at::Tensor decoder_layers(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                          const std::vector<int64_t>& segment_rows, const std::vector<at::Tensor>& keys,
                          const std::vector<at::Tensor>& values, const std::vector<int64_t>& starts,
                          const std::vector<at::Tensor>& masks, const std::vector<at::Tensor>& tensors,
                          const std::vector<int64_t>& ints, const std::vector<double>& eps, int64_t heads,
                          int64_t kv_heads, int64_t intermediate, double scale) {
    const size_t segments = segment_rows.size();
    TORCH_CHECK(segments >= 1 && masks.size() == segments && keys.size() % segments == 0,
                "decoder_layers: one mask and the same number of layers per sequence");
    const size_t layers = keys.size() / segments;
    TORCH_CHECK(values.size() == keys.size() && starts.size() == keys.size() && eps.size() == 2 * layers,
                "decoder_layers: keys, values, starts and eps must describe the same layers");
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
                "decoder_layers: x must be a contiguous float32 CPU [rows, hidden] tensor");
    std::vector<int64_t> first_row(segments + 1, 0);
    for (size_t s = 0; s < segments; ++s) first_row[s + 1] = first_row[s] + segment_rows[s];
    TORCH_CHECK(first_row[segments] == x.size(0), "decoder_layers: the sequences' rows do not add up to x's");
    std::vector<c10::optional<at::Tensor>> mask_t(segments);
    for (size_t s = 0; s < segments; ++s)
        if (masks[s].numel() > 0) mask_t[s] = masks[s];
    std::vector<at::Tensor> layer_keys(segments), layer_values(segments);
    std::vector<int64_t> layer_starts(segments);
    Cursor c{tensors, ints};
    for (size_t l = 0; l < layers; ++l) {
        const at::Tensor& attn_norm = c.tensor();
        const at::Tensor& mlp_norm = c.tensor();
        const at::Tensor qkv = projection(rms_norm(x, attn_norm, eps[2 * l]), c);
        for (size_t s = 0; s < segments; ++s) {  // this layer's buffers and starts of every sequence
            layer_keys[s] = keys[s * layers + l];
            layer_values[s] = values[s * layers + l];
            layer_starts[s] = starts[s * layers + l];
        }
        // attention per sequence over its own cache, all sequences in one parallel region
        const at::Tensor att = rope_attend_batch(qkv, cos, sin, first_row, layer_keys, layer_values, layer_starts,
                                                 mask_t, heads, kv_heads, scale);
        // the first add makes x our own tensor (the caller's may be an embedding's view); then in place
        x = l == 0 ? x.add(projection(att, c)) : x.add_(projection(att, c));
        const at::Tensor gate_up = projection(rms_norm(x, mlp_norm, eps[2 * l + 1]), c);
        x.add_(projection(swiglu(gate_up, intermediate), c));
    }
    TORCH_CHECK(c.t == tensors.size() && c.i == ints.size(), "decoder_layers: the weights list is longer than ",
                layers, " layers");
    return x;
}
