// Multi-row int8 and int4 linear layers on AVX-512 VNNI CPUs: y[m, n] = sum_k x[m, k] * W[n, k] for 1 to 64 (or
// more) rows, with W in quant.py's formats and the activations quantised per row to int8 on every call.
//
// Why: torch's packed int4/int8 CPU kernels are built for one row, so a verify pass of k + 1 rows costs nearly
// k + 1 steps. Here the weights stream from memory once per call for all rows, and the products are integer dot
// products (`vpdpbusd`: 64 u8 x s8 products summed in fours into 16 int32 lanes per instruction). Two loop orders:
// for few rows (int8 1-3; int4 1-2, 1-12 on Xeons with AMX: int4_many_rows) a group of weight panels is the outer
// loop and row chunks the inner one, the float sums in registers (int8_tile, int4_tile); for more rows (verify
// passes, batches, prompts: bound by the arithmetic) the weights of two panels over 32 inputs sit in registers and
// every row of a block of 32 runs over them (int8_tile_rows, int4_tile_rows).
//
// Activations: per row, scale = max|x| / 127 and xq = round-half-even(x / scale) in [-127, 127] (a row of zeros:
// xq = 0). The row's scale is its own, so a row's result does not depend on the other rows of the call.
//
// int8 (per output channel, symmetric: w = q * s[n], q in [-128, 127]): vpdpbusd wants one operand unsigned, so the
// activations enter as xq + 128 (u8) against the signed weights, and 128 * sum_k q[n, k] (precomputed per output
// column) is subtracted: sum_k xq q = sum_k (xq + 128) q - 128 sum_k q. y = float(sum) * scale_m * s[n].
// Packed [Np/16, Kp/4, 16, 4]: 16 output columns side by side, 4 consecutive inputs per column (one int32 lane).
// K and N are padded with zero weights to multiples of 4 and 16.
//
// int4 (per group of G inputs, asymmetric: w = (q - 8) * scale[g, n] + zero[g, n], q in [0, 15]): the weights are
// already unsigned, so they are vpdpbusd's u8 operand and the activations its s8 one; per group
// sum_k x w = scale_m * (scale[g, n] * sum_k q xq + (zero[g, n] - 8 scale[g, n]) * sum_k xq), the integer sums exact,
// the float sum over groups in group order. Packed [N/16, K/8, 16, 4] bytes: byte (j, i) of input octet o holds
// q[n0 + j, 8o + i] in its low and q[n0 + j, 8o + 4 + i] in its high nibble; scales and zeros (bfloat16, as the
// format stores them) [N/16, K/G, 2, 16].
//
// Every output element is computed by the same instruction sequence whatever the number of rows or the tile that
// holds it (integer sums are exact; float operations in a fixed order), so a verify pass gives each row the bits
// of its one-row step.
//
// AMX (Intel Xeons from Sapphire Rapids): from 4 (int8) or 13 (int4) rows the integer sums run on the tile unit
// (int8_amx, int4_amx), to the same bits.
// ATen only, not torch/extension.h: the pybind11 and libtorch API headers take ~2/3 of a translation unit's
// compile time; panel_linear.cpp (the module definition) is the one that needs them
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,fma")

namespace {

constexpr int kPanelGroup = 8;  // panels of 16 columns that all row chunks share from cache

struct Rows {                    // the quantised activations of one call
    const uint8_t* x;            // [M, stride] bytes: xq + 128 (int8 kernel) or xq (int4 kernel, as int8)
    int64_t stride;
    const float* scale;          // [M]
    const float* group_sum;      // [M, groups]: sum of xq over each group (int4 kernel)
    int64_t groups;
};

inline int32_t four_bytes(const uint8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// acc += u8 x s8 in fours (vpdpbusd), the s8 operand one int32 from memory broadcast to the 16 lanes ({1to16}). Inline
// assembly so that the broadcast is folded into the instruction and the sum stays in its register (tied "+v"): with
// the intrinsic, GCC 12 copied the accumulators around every instruction of int4_tile_rows' loop (seen in objdump).
// int8_tile and int4_tile keep the intrinsic: there the assembly form measured slower (more spills).
inline void dpbusd_bcast(__m512i& acc, __m512i u8, const void* s8) {
    asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u8), "m"(*static_cast<const int32_t*>(s8)));
}

inline __m512 bf16_to_f32(const uint16_t* p) {  // 16 bfloat16 -> 16 float32 (a bfloat16 is a float32's top half)
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

inline void store(float* y, int64_t n0, int64_t N, __m512 v) {
    if (n0 + 16 <= N) {
        _mm512_storeu_ps(y + n0, v);
    } else {
        _mm512_mask_storeu_ps(y + n0, static_cast<__mmask16>((1u << (N - n0)) - 1), v);
    }
}

// The int8 output of one row and 16 columns from its exact integer sum: float(sum - 128 sum_k q) * the row's scale *
// the columns' scales. Every int8 tile ends here, so a row's bits never depend on the tile that computed it.
inline __m512 int8_output(__m512i sum, __m512i offset, float row_scale, __m512 scales) {
    const __m512 total = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum, offset));
    return _mm512_mul_ps(_mm512_mul_ps(total, _mm512_set1_ps(row_scale)), scales);
}

// One group's step of an int4 row's float sum: acc + scale * sum(q xq), then + (zero - 8 scale) * sum(xq). Every
// int4 tile takes it, group after group, so a row's bits never depend on the tile that computed it.
inline __m512 int4_group_step(__m512 acc, __m512 scale, __m512i isum, __m512 low, float group_sum) {
    return _mm512_fmadd_ps(low, _mm512_set1_ps(group_sum), _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(isum), acc));
}

// int8: M rows x NB panels, all of K.
template <int M, int NB>
void int8_tile(const Rows& r, int64_t m0, const int8_t* packed, int64_t quads, const int32_t* col_sums,
               const float* scales, float* y, int64_t N, int64_t p0) {
    __m512i acc[M][NB];
    for (int m = 0; m < M; ++m)
        for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_si512();
    const int8_t* panel[NB];
    for (int b = 0; b < NB; ++b) panel[b] = packed + (p0 + b) * quads * 64;
    const uint8_t* x = r.x + m0 * r.stride;
    for (int64_t q = 0; q < quads; ++q) {
        __m512i w[NB];
        for (int b = 0; b < NB; ++b) {
            w[b] = _mm512_loadu_si512(panel[b] + q * 64);
            _mm_prefetch(reinterpret_cast<const char*>(panel[b] + q * 64 + 4096), _MM_HINT_T0);
        }
        for (int m = 0; m < M; ++m) {
            const __m512i a = _mm512_set1_epi32(four_bytes(x + m * r.stride + q * 4));
            for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_dpbusd_epi32(acc[m][b], a, w[b]);
        }
    }
    for (int b = 0; b < NB; ++b) {
        const int64_t n0 = (p0 + b) * 16;
        const __m512i offset = _mm512_loadu_si512(col_sums + n0);
        const __m512 s = _mm512_loadu_ps(scales + n0);
        for (int m = 0; m < M; ++m) {
            store(y + (m0 + m) * N, n0, N, int8_output(acc[m][b], offset, r.scale[m0 + m], s));
        }
    }
}

// int4: M rows x NB panels, all of K, group by group.
template <int M, int NB>
void int4_tile(const Rows& r, int64_t m0, const uint8_t* packed, int64_t octets, int64_t group,
               const uint16_t* scales_zeros, float* y, int64_t N, int64_t p0) {
    __m512 acc[M][NB];
    for (int m = 0; m < M; ++m)
        for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
    const uint8_t* panel[NB];
    for (int b = 0; b < NB; ++b) panel[b] = packed + (p0 + b) * octets * 64;
    const int64_t per_group = group / 8, groups = octets / per_group;
    const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
    const int8_t* x = reinterpret_cast<const int8_t*>(r.x) + m0 * r.stride;
    for (int64_t g = 0; g < groups; ++g) {
        __m512i isum[M][NB];
        for (int m = 0; m < M; ++m)
            for (int b = 0; b < NB; ++b) isum[m][b] = _mm512_setzero_si512();
        for (int64_t o = g * per_group; o < (g + 1) * per_group; ++o) {
            __m512i lo[NB], hi[NB];
            for (int b = 0; b < NB; ++b) {
                const __m512i v = _mm512_loadu_si512(panel[b] + o * 64);
                _mm_prefetch(reinterpret_cast<const char*>(panel[b] + o * 64 + 4096), _MM_HINT_T0);
                lo[b] = _mm512_and_si512(v, low_nibbles);
                hi[b] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibbles);
            }
            for (int m = 0; m < M; ++m) {
                const int8_t* xm = x + m * r.stride + o * 8;
                const __m512i a0 = _mm512_set1_epi32(four_bytes(reinterpret_cast<const uint8_t*>(xm)));
                const __m512i a1 = _mm512_set1_epi32(four_bytes(reinterpret_cast<const uint8_t*>(xm + 4)));
                for (int b = 0; b < NB; ++b) {
                    isum[m][b] = _mm512_dpbusd_epi32(isum[m][b], lo[b], a0);
                    isum[m][b] = _mm512_dpbusd_epi32(isum[m][b], hi[b], a1);
                }
            }
        }
        for (int b = 0; b < NB; ++b) {
            const uint16_t* sz = scales_zeros + ((p0 + b) * groups + g) * 32;
            const __m512 scale = bf16_to_f32(sz), zero = bf16_to_f32(sz + 16);
            const __m512 low = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scale, zero);  // zero - 8 scale, exact
            for (int m = 0; m < M; ++m) {
                acc[m][b] = int4_group_step(acc[m][b], scale, isum[m][b], low, r.group_sum[(m0 + m) * r.groups + g]);
            }
        }
    }
    for (int b = 0; b < NB; ++b) {
        const int64_t n0 = (p0 + b) * 16;
        for (int m = 0; m < M; ++m) {
            const __m512 v = _mm512_mul_ps(acc[m][b], _mm512_set1_ps(r.scale[m0 + m]));
            store(y + (m0 + m) * N, n0, N, v);
        }
    }
}

// int8 for many rows, int4_tile_rows' scheme: 8 quads (32 inputs) of NB panels held in 16 registers, every row of a
// block of up to kRowBlock rows runs over them (8 x NB vpdpbusd, its int32 sums added to a small buffer), so the
// weights are read once per row block instead of once per chunk of 8 rows. The integer sums are exact, so the result
// is int8_tile's to the bit.
constexpr int64_t kRowBlock = 32;  // rows per block of the many-row tiles (their accumulators: 4 KiB)

template <int NB>
void int8_tile_rows(const Rows& r, int64_t m0, int64_t M, const int8_t* packed, int64_t quads, const int32_t* col_sums,
                    const float* scales, float* y, int64_t N, int64_t p0) {
    constexpr int kQuads = 8;
    const int8_t* panel[NB];
    for (int b = 0; b < NB; ++b) panel[b] = packed + (p0 + b) * quads * 64;
    alignas(64) int32_t acc[kRowBlock][NB * 16];
    for (int64_t m = 0; m < M; ++m)
        for (int b = 0; b < NB; ++b) _mm512_store_si512(acc[m] + 16 * b, _mm512_setzero_si512());
    const uint8_t* x = r.x + m0 * r.stride;
    int64_t q0 = 0;
    for (; q0 + kQuads <= quads; q0 += kQuads) {
        __m512i w[kQuads][NB];
        for (int q = 0; q < kQuads; ++q)
            for (int b = 0; b < NB; ++b) {
                const int8_t* p = panel[b] + (q0 + q) * 64;
                w[q][b] = _mm512_loadu_si512(p);
                _mm_prefetch(reinterpret_cast<const char*>(p + 2048), _MM_HINT_T0);
            }
        for (int64_t m = 0; m < M; ++m) {
            const uint8_t* xm = x + m * r.stride + q0 * 4;
            __m512i isum[NB];
            for (int b = 0; b < NB; ++b) isum[b] = _mm512_load_si512(acc[m] + 16 * b);
            for (int q = 0; q < kQuads; ++q) {
                const __m512i a = _mm512_set1_epi32(four_bytes(xm + q * 4));
                for (int b = 0; b < NB; ++b) isum[b] = _mm512_dpbusd_epi32(isum[b], a, w[q][b]);
            }
            for (int b = 0; b < NB; ++b) _mm512_store_si512(acc[m] + 16 * b, isum[b]);
        }
    }
    for (int64_t m = 0; m < M; ++m) {  // the last quads (fewer than 8)
        const uint8_t* xm = x + m * r.stride;
        for (int b = 0; b < NB; ++b) {
            __m512i sum = _mm512_load_si512(acc[m] + 16 * b);
            for (int64_t q = q0; q < quads; ++q)
                sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi32(four_bytes(xm + q * 4)),
                                          _mm512_loadu_si512(panel[b] + q * 64));
            const int64_t n0 = (p0 + b) * 16;
            store(y + (m0 + m) * N, n0, N, int8_output(sum, _mm512_loadu_si512(col_sums + n0), r.scale[m0 + m],
                                                      _mm512_loadu_ps(scales + n0)));
        }
    }
}

// R rows (1 or 2: two rows' sums are independent chains the core overlaps) of one group of 32 inputs over NB
// unpacked panels: integer sums, then acc += scale * sum and acc += (zero - 8 scale) * the row's sum of xq.
template <int NB, int R>
inline void rows_of_group(const __m512i (&lo)[4][NB], const __m512i (&hi)[4][NB], const __m512 (&scale)[NB],
                          const __m512 (&low)[NB], const int8_t* x, int64_t stride, const float* group_sum,
                          int64_t groups, float* acc) {
    __m512i isum[R][NB];
    for (int i = 0; i < R; ++i)
        for (int b = 0; b < NB; ++b) isum[i][b] = _mm512_setzero_si512();
    for (int o = 0; o < 4; ++o)
        for (int i = 0; i < R; ++i)
            for (int b = 0; b < NB; ++b) {
                dpbusd_bcast(isum[i][b], lo[o][b], x + i * stride + o * 8);
                dpbusd_bcast(isum[i][b], hi[o][b], x + i * stride + o * 8 + 4);
            }
    for (int i = 0; i < R; ++i)
        for (int b = 0; b < NB; ++b) {
            float* a = acc + i * NB * 16 + 16 * b;
            _mm512_store_ps(a, int4_group_step(_mm512_load_ps(a), scale[b], isum[i][b], low[b], group_sum[i * groups]));
        }
}

// int4 for 3 or more rows, groups of 32 inputs (the format's default): the NB panels' group of weights is unpacked
// into registers once (4 octets x low/high nibbles x NB panels = 16 registers) and up to kRowBlock rows run over it,
// so the weights are unpacked once per row block, whatever the number of rows. The float accumulators live in a
// small contiguous buffer (in y, rows N floats apart, every row maps to the same L1 sets when N is a multiple of
// 1024: measured 1.64 instead of 2.3 G vpdpbusd/s at 16 rows); the integer sums of one row are NB registers, their
// chains overlapped across rows by the out-of-order core. The float operations and their order are int4_tile's, so
// a row's bits do not depend on the tile that computes it.
template <int NB>
void int4_tile_rows(const Rows& r, int64_t m0, int64_t M, const uint8_t* packed, int64_t octets,
                    const uint16_t* scales_zeros, float* y, int64_t N, int64_t p0) {
    constexpr int kOctets = 4;  // a group of 32 inputs
    const int64_t groups = octets / kOctets;
    const uint8_t* panel[NB];
    for (int b = 0; b < NB; ++b) panel[b] = packed + (p0 + b) * octets * 64;
    alignas(64) float acc[kRowBlock][NB * 16];
    for (int64_t m = 0; m < M; ++m)
        for (int b = 0; b < NB; ++b) _mm512_store_ps(acc[m] + 16 * b, _mm512_setzero_ps());
    const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
    const int8_t* x = reinterpret_cast<const int8_t*>(r.x) + m0 * r.stride;
    const float* group_sum = r.group_sum + m0 * r.groups;
    for (int64_t g = 0; g < groups; ++g) {
        __m512i lo[kOctets][NB], hi[kOctets][NB];
        for (int o = 0; o < kOctets; ++o)
            for (int b = 0; b < NB; ++b) {
                const uint8_t* p = panel[b] + (g * kOctets + o) * 64;
                const __m512i v = _mm512_loadu_si512(p);
                _mm_prefetch(reinterpret_cast<const char*>(p + 2048), _MM_HINT_T0);
                lo[o][b] = _mm512_and_si512(v, low_nibbles);
                hi[o][b] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibbles);
            }
        __m512 scale[NB], low[NB];
        for (int b = 0; b < NB; ++b) {
            const uint16_t* sz = scales_zeros + ((p0 + b) * groups + g) * 32;
            scale[b] = bf16_to_f32(sz);
            low[b] = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scale[b], bf16_to_f32(sz + 16));  // zero - 8 scale, exact
        }
        const int8_t* xg = x + g * kOctets * 8;
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) rows_of_group<NB, 2>(lo, hi, scale, low, xg + m * r.stride, r.stride,
                                                        group_sum + m * r.groups + g, r.groups, acc[m]);
        if (m < M) rows_of_group<NB, 1>(lo, hi, scale, low, xg + m * r.stride, r.stride, group_sum + m * r.groups + g,
                                        r.groups, acc[m]);
    }
    for (int64_t m = 0; m < M; ++m) {
        const __m512 s = _mm512_set1_ps(r.scale[m0 + m]);
        for (int b = 0; b < NB; ++b)
            _mm512_storeu_ps(y + (m0 + m) * N + (p0 + b) * 16, _mm512_mul_ps(_mm512_load_ps(acc[m] + 16 * b), s));
    }
}

// ---- AMX (Intel Xeons from Sapphire Rapids): the many-row passes on tile registers ----
//
// The integer sums of int8_tile_rows and int4_tile_rows, computed by the tile unit instead of vpdpbusd: one tile
// instruction multiplies 16 rows by 16 columns over 32 (int4: a group) or 64 (int8) inputs. Both packed formats
// already hold the weights in the tile unit's B layout (per row of 64 bytes: 16 columns x 4 consecutive inputs),
// int8 as stored, int4 once its nibbles are split (the low nibbles of an octet are inputs 0-3, the high 4-7). The
// integer sums are exact and the float epilogue is the VNNI tiles' (same operations, same order), so a row's bits
// are those of its one-row step whichever unit ran the pass. Used from kAmxInt8Rows / kAmxInt4Rows rows, when
// quant_amx(true) found the tile unit and Linux granted the process its state (arch_prctl ARCH_REQ_XCOMP_PERM).
// From how many rows the tiles run (bench/quant_kernel.py, 2-core Xeon: int8 on tiles was slower at 3 rows and
// faster from 4; int4 from 13, where the register tiles of up to 12 rows stop: each group's sums leave the tiles
// through memory for the float epilogue, so at 8 rows the tiles were 15 % slower than the register tiles and whole
// passes of 9-11 rows 3-8 % slower, at 12 rows within 2 %, 2026-12-07).
constexpr int kAmxInt8Rows = 4, kAmxInt4Rows = 13;
bool g_amx = false;

struct alignas(64) TileConfig {  // LDTILECFG's 64-byte operand, palette 1
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

}  // namespace
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8")
namespace {

// Tiles 0-3: sums (16 rows x 16 int32; 0, 1 for rows 0-15 of panels p, p + 1; 2, 3 for rows 16-31); 4, 5:
// activations of rows 0-15 and 16-31 (16 x a_bytes); 6, 7: weights of panels p, p + 1 (b_rows x 64 bytes).
void configure_tiles(int a_bytes, int b_rows) {
    TileConfig c;
    for (int t = 0; t < 4; ++t) { c.rows[t] = 16; c.colsb[t] = 64; }
    for (int t = 4; t < 6; ++t) { c.rows[t] = 16; c.colsb[t] = static_cast<uint16_t>(a_bytes); }
    for (int t = 6; t < 8; ++t) { c.rows[t] = static_cast<uint8_t>(b_rows); c.colsb[t] = 64; }
    _tile_loadconfig(&c);
}

// int8 on tiles, panels [pa, pb) in pairs, rows in blocks of 32 (two of 16); the activation buffer holds whole
// blocks of 32 rows (zero rows past M). K in steps of 64 (quads % 16 == 0).
void int8_amx(const Rows& r, int64_t M, const int8_t* packed, int64_t quads, const int32_t* col_sums,
              const float* scales, float* y, int64_t N, int64_t pa, int64_t pb) {
    configure_tiles(64, 16);
    alignas(64) int32_t sums[4][16][16];
    for (int64_t p = pa; p < pb; p += 2) {
        const int NB = p + 2 <= pb ? 2 : 1;
        const int8_t* w0 = packed + p * quads * 64;
        const int8_t* w1 = packed + (p + NB - 1) * quads * 64;
        for (int64_t m0 = 0; m0 < M; m0 += 32) {
            const bool two = m0 + 16 < M;
            const uint8_t* x = r.x + m0 * r.stride;
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t q = 0; q < quads; q += 16) {
                _tile_loadd(6, w0 + q * 64, 64);
                _tile_loadd(7, w1 + q * 64, 64);
                _tile_loadd(4, x + q * 4, r.stride);
                _tile_dpbusd(0, 4, 6);
                _tile_dpbusd(1, 4, 7);
                if (two) {
                    _tile_loadd(5, x + 16 * r.stride + q * 4, r.stride);
                    _tile_dpbusd(2, 5, 6);
                    _tile_dpbusd(3, 5, 7);
                }
            }
            _tile_stored(0, sums[0], 64); _tile_stored(1, sums[1], 64);
            if (two) { _tile_stored(2, sums[2], 64); _tile_stored(3, sums[3], 64); }
            for (int64_t m = m0; m < std::min<int64_t>(m0 + 32, M); ++m) {
                const int half = (m - m0) / 16, row = (m - m0) % 16;
                for (int b = 0; b < NB; ++b) {
                    const int64_t n0 = (p + b) * 16;
                    store(y + m * N, n0, N, int8_output(_mm512_load_si512(sums[2 * half + b][row]),
                                                        _mm512_loadu_si512(col_sums + n0), r.scale[m],
                                                        _mm512_loadu_ps(scales + n0)));
                }
            }
        }
    }
    _tile_release();
}

// int4 on tiles (groups of 32), in stages of kStage groups so that no step waits on the one before it (a tile load
// of just-stored bytes, and a load of a just-stored tile, each wait for the store to complete): the stage's weights
// of two panels are unpacked into a buffer (the low nibbles of an octet are inputs 0-3, the high 4-7: the tile
// unit's B layout), then one tile instruction per group, panel and 16 rows leaves its integer sums in a second
// buffer, then int4_tile's float epilogue runs over the stage's groups in group order, each row's float sum in a
// register.
constexpr int64_t kStage = 3;  // groups per stage (of 1, 3 and 6 measured, 3 was best by 5-10 % at 12-16 rows)

void int4_amx(const Rows& r, int64_t M, const uint8_t* packed, int64_t octets, const uint16_t* scales_zeros,
              float* y, int64_t N, int64_t pa, int64_t pb) {
    constexpr int kOctets = 4;  // a group of 32 inputs
    const int64_t groups = octets / kOctets;
    configure_tiles(32, 8);
    alignas(64) uint8_t weights[kStage][2][8][64];
    alignas(64) int32_t sums[kStage][4][16][16];
    alignas(64) float acc[kRowBlock][32];
    const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
    for (int64_t p = pa; p < pb; p += 2) {
        const int NB = p + 2 <= pb ? 2 : 1;
        for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
            const int64_t rows = std::min<int64_t>(kRowBlock, M - m0);
            const bool two = rows > 16;
            for (int64_t m = 0; m < rows; ++m)
                for (int b = 0; b < 2; ++b) _mm512_store_ps(acc[m] + 16 * b, _mm512_setzero_ps());
            const int8_t* x = reinterpret_cast<const int8_t*>(r.x) + m0 * r.stride;
            const float* group_sum = r.group_sum + m0 * r.groups;
            for (int64_t g0 = 0; g0 < groups; g0 += kStage) {
                const int64_t stage = std::min<int64_t>(kStage, groups - g0);
                for (int64_t s = 0; s < stage; ++s)
                    for (int b = 0; b < NB; ++b) {
                        const uint8_t* panel = packed + (p + b) * octets * 64 + (g0 + s) * kOctets * 64;
                        for (int o = 0; o < kOctets; ++o) {
                            const __m512i v = _mm512_loadu_si512(panel + o * 64);
                            _mm_prefetch(reinterpret_cast<const char*>(panel + o * 64 + 2048), _MM_HINT_T0);
                            _mm512_store_si512(weights[s][b][2 * o], _mm512_and_si512(v, low_nibbles));
                            _mm512_store_si512(weights[s][b][2 * o + 1],
                                               _mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibbles));
                        }
                    }
                for (int64_t s = 0; s < stage; ++s) {  // (a lone last panel: its twin's tile is a copy, unused)
                    const int64_t g = g0 + s;
                    _tile_loadd(6, weights[s][0], 64);
                    _tile_loadd(7, weights[s][NB - 1], 64);
                    _tile_loadd(4, x + g * 32, r.stride);
                    _tile_zero(0); _tile_zero(1);
                    _tile_dpbsud(0, 4, 6);
                    _tile_dpbsud(1, 4, 7);
                    _tile_stored(0, sums[s][0], 64); _tile_stored(1, sums[s][1], 64);
                    if (two) {
                        _tile_loadd(5, x + 16 * r.stride + g * 32, r.stride);
                        _tile_zero(2); _tile_zero(3);
                        _tile_dpbsud(2, 5, 6);
                        _tile_dpbsud(3, 5, 7);
                        _tile_stored(2, sums[s][2], 64); _tile_stored(3, sums[s][3], 64);
                    }
                }
                __m512 scale[kStage][2], low[kStage][2];
                for (int64_t s = 0; s < stage; ++s)
                    for (int b = 0; b < NB; ++b) {
                        const uint16_t* sz = scales_zeros + ((p + b) * groups + g0 + s) * 32;
                        scale[s][b] = bf16_to_f32(sz);
                        low[s][b] = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scale[s][b], bf16_to_f32(sz + 16));
                    }
                for (int64_t m = 0; m < rows; ++m) {
                    const int half = m / 16, row = m % 16;
                    const float* gs = group_sum + m * r.groups + g0;
                    for (int b = 0; b < NB; ++b) {
                        __m512 a = _mm512_load_ps(acc[m] + 16 * b);
                        for (int64_t s = 0; s < stage; ++s) {
                            a = int4_group_step(a, scale[s][b], _mm512_load_si512(sums[s][2 * half + b][row]),
                                                low[s][b], gs[s]);
                        }
                        _mm512_store_ps(acc[m] + 16 * b, a);
                    }
                }
            }
            for (int64_t m = 0; m < rows; ++m) {
                const __m512 s = _mm512_set1_ps(r.scale[m0 + m]);
                for (int b = 0; b < NB; ++b)
                    _mm512_storeu_ps(y + (m0 + m) * N + (p + b) * 16,
                                     _mm512_mul_ps(_mm512_load_ps(acc[m] + 16 * b), s));
            }
        }
    }
    _tile_release();
}

}  // namespace
#pragma GCC pop_options
namespace {

// Whether the CPU has AMX-TILE and AMX-INT8 (CPUID leaf 7: EDX bits 24, 25) and Linux lets this process use the
// tile state (XFEATURE_XTILEDATA = 18, requested once per process).
bool cpu_has_amx() {
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 24)) && (d & (1u << 25));
}

bool amx_available() {
    return cpu_has_amx() && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) == 0;
}

// Panels [pa, pb) for rows [m0, m0 + M): tiles of NB panels, NB chosen so the accumulators fit the 32 registers.
template <int M>
void int8_rows(const Rows& r, int64_t m0, const int8_t* packed, int64_t quads, const int32_t* col_sums,
               const float* scales, float* y, int64_t N, int64_t pa, int64_t pb) {
    constexpr int NB = 4;  // M <= 3 rows (int8_worker) x 4 panels: 12 accumulators
    int64_t p = pa;
    for (; p + NB <= pb; p += NB) int8_tile<M, NB>(r, m0, packed, quads, col_sums, scales, y, N, p);
    for (; p < pb; ++p) int8_tile<M, 1>(r, m0, packed, quads, col_sums, scales, y, N, p);
}

template <int M>
void int4_rows(const Rows& r, int64_t m0, const uint8_t* packed, int64_t octets, int64_t group,
               const uint16_t* scales_zeros, float* y, int64_t N, int64_t pa, int64_t pb) {
    constexpr int NB = M <= 2 ? 4 : 1;  // 3-12 rows: one panel (2M + 5 registers; two panels measured slower)
    int64_t p = pa;
    for (; p + NB <= pb; p += NB) int4_tile<M, NB>(r, m0, packed, octets, group, scales_zeros, y, N, p);
    for (; p < pb; ++p) int4_tile<M, 1>(r, m0, packed, octets, group, scales_zeros, y, N, p);
}

using Int8Fn = void (*)(const Rows&, int64_t, const int8_t*, int64_t, const int32_t*, const float*,
                        float*, int64_t, int64_t, int64_t);
constexpr int kInt8ManyRows = 4;  // from this many rows, int8_tile_rows; fewer: int8_tile in one chunk
constexpr Int8Fn kInt8Rows[kInt8ManyRows] = {nullptr, int8_rows<1>, int8_rows<2>, int8_rows<3>};
using Int4Fn = void (*)(const Rows&, int64_t, const uint8_t*, int64_t, int64_t, const uint16_t*,
                        float*, int64_t, int64_t, int64_t);
constexpr int kInt4Chunk = 12;  // 2 x 12 + 5 = 29 of the 32 registers
constexpr Int4Fn kInt4Rows[kInt4Chunk + 1] = {nullptr, int4_rows<1>, int4_rows<2>, int4_rows<3>, int4_rows<4>,
                                              int4_rows<5>, int4_rows<6>, int4_rows<7>, int4_rows<8>,
                                              int4_rows<9>, int4_rows<10>, int4_rows<11>, int4_rows<12>};
// From how many rows (and groups of 32) int4_tile_rows takes over from the register tiles, per CPU kind, as measured
// (bench/quant_kernel.py, SmolLM2-135M's 120 decoder matrices streaming, 2 threads): on a 2-core AMD EPYC (no AMX)
// from 3 rows, against chunks of 4 rows x 2 panels; on a 2-core Intel Xeon with AMX past the register tiles' 12
// rows (where the tiles are off: with them on, int4_amx takes 13 rows and more, kAmxInt4Rows): there the register
// tiles of one panel and up to 12 rows were 7-15 % faster at 3-8 rows (3 rows 2.85-3.01 against 3.28-3.36 ms, 5 rows
// 3.58-3.72 against 3.92-4.04, 7 rows 4.39-4.64 against 4.76-4.94), and whole passes of 9-11 rows 3-8 % faster than
// on the AMX tiles (2026-12-07). Whatever runs, the bits are the same.
int int4_many_rows() {
    static const int rows = cpu_has_amx() ? kInt4Chunk + 1 : 3;
    return rows;
}

// round-half-even(x / s), x / s the correctly rounded quotient, without a division where it cannot matter: t = x *
// (1 / s) is within 2 ulps of it (two roundings of at most half an ulp each, and the quotient's own), so where t lies
// farther than that from every half-integer, t and the quotient round to the same integer. |x / s| <= 127.0001 (s =
// max|x| / 127) bounds the ulp by 2^-16; the margin is 2^-12. Vectors with a lane nearer a half-integer (one lane in
// ~2000 of random inputs) take the true division there: the bits are always the division's, mostly at a multiply's
// cost (a division of 16 lanes takes ~16 cycles).
inline __m512 nearest_quotient(__m512 x, __m512 s, __m512 inv) {
    constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512 t = _mm512_mul_ps(x, inv);
    const __m512 half_away = _mm512_sub_ps(_mm512_sub_ps(t, _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF |
                                                                                   _MM_FROUND_NO_EXC)),
                                           _mm512_set1_ps(0.5f));
    const __mmask16 near = _mm512_cmp_ps_mask(_mm512_abs_ps(half_away), _mm512_set1_ps(1.0f / 4096), _CMP_LT_OQ);
    if (near == 0) return _mm512_roundscale_ps(t, kNearest);
    return _mm512_roundscale_ps(_mm512_mask_div_ps(t, near, x, s), kNearest);
}

// Per-row activation quantisation into `out` ([M, stride] bytes, xq + offset, zero padding to `stride`), 16 lanes at a
// time (it runs on every call for every row: scalar, it was a third of a 16-row int4 pass). The bits of the scalar
// form: a true division by the scale (nearest_quotient), round half to even, clamp to [-127, 127].
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t stride, int offset, uint8_t* out, float* scale) {
    const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    const __m512i shift = _mm512_set1_epi32(offset);
    for (int64_t m = 0; m < M; ++m) {
        const float* row = x + m * K;
        __m512 vmax = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
        float amax = _mm512_reduce_max_ps(vmax);
        for (; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
        const float s = amax / 127.0f;
        scale[m] = s;
        uint8_t* o = out + m * stride;
        if (s > 0.0f) {
            // (a scale so small that its reciprocal overflows, max|x| < ~1e-36: the division everywhere)
            const float reciprocal = 1.0f / s;
            const bool multiply = std::isfinite(reciprocal);
            const __m512 vs = _mm512_set1_ps(s), inv = _mm512_set1_ps(reciprocal);
            for (k = 0; k + 16 <= K; k += 16) {
                const __m512 xk = _mm512_loadu_ps(row + k);
                __m512 q = multiply ? nearest_quotient(xk, vs, inv)
                                    : _mm512_roundscale_ps(_mm512_div_ps(xk, vs), _MM_FROUND_TO_NEAREST_INT |
                                                                                  _MM_FROUND_NO_EXC);
                q = _mm512_min_ps(hi, _mm512_max_ps(lo, q));
                const __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(q), shift);
                _mm_storeu_si128(reinterpret_cast<__m128i*>(o + k), _mm512_cvtepi32_epi8(v));
            }
            for (; k < K; ++k) {
                const float q = std::nearbyint(row[k] / s);
                o[k] = static_cast<uint8_t>(static_cast<int>(std::min(127.0f, std::max(-127.0f, q))) + offset);
            }
        } else {
            std::memset(o, offset, K);
        }
        for (k = K; k < stride; ++k) o[k] = static_cast<uint8_t>(offset);
    }
}

// The int4 kernel's sum of a quantised row's xq over each group of `group` inputs (exact integers, as floats).
void group_sums(const int8_t* q, int64_t K, int64_t group, float* out) {
    for (int64_t g = 0; g < K / group; ++g) {
        const int8_t* p = q + g * group;
        __m512i acc = _mm512_setzero_si512();
        int64_t k = 0;
        for (; k + 16 <= group; k += 16)
            acc = _mm512_add_epi32(acc, _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k))));
        int32_t sum = _mm512_reduce_add_epi32(acc);
        for (; k < group; ++k) sum += p[k];
        out[g] = static_cast<float>(sum);
    }
}

// From how many rows a call quantises its rows on all threads rather than one (2 threads, SmolLM2's widths 576 and
// 1536, 2026-12-07: at 2-4 rows the threads' start cost ~1 us more than they saved, from 6 rows they saved 5-10 %
// of the call, at 16 rows ~3 us of ~25-45).
constexpr int64_t kParallelQuantizeRows = 6;

// quantize_rows, and for the int4 kernel (sums != nullptr) each row's group sums, over the rows on all threads where
// there are enough of them: every row is quantised on its own, so the thread that does it cannot change its bits.
void prepare_rows(const float* x, int64_t M, int64_t K, int64_t stride, int offset, uint8_t* out, float* scale,
                  int64_t group, float* sums) {
    const auto rows = [&](int64_t a, int64_t b) {
        quantize_rows(x + a * K, b - a, K, stride, offset, out + a * stride, scale + a);
        if (sums != nullptr)
            for (int64_t m = a; m < b; ++m)
                group_sums(reinterpret_cast<const int8_t*>(out + m * stride), K, group, sums + m * (K / group));
    };
    if (M >= kParallelQuantizeRows) {
        at::parallel_for(0, M, 1, rows);
    } else {
        rows(0, M);
    }
}

// The activation buffer's rows: whole blocks of 32 (the AMX tiles load 16 rows at a time; the rows past M are zero
// and their sums unused).
int64_t padded_rows(int64_t M) { return (M + 31) / 32 * 32; }

void check_input(const at::Tensor& x, const char* name) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
                name, ": x must be a 2-D float32 CPU tensor");
}

void int8_worker(const Rows& r, int64_t M, const int8_t* wp, int64_t quads, const int32_t* cs, const float* sc,
                 float* yp, int64_t N, int64_t pa, int64_t pb) {
    if (g_amx && M >= kAmxInt8Rows && quads % 16 == 0) {
        int8_amx(r, M, wp, quads, cs, sc, yp, N, pa, pb);
        return;
    }
    if (M >= kInt8ManyRows) {
        for (int64_t p = pa; p < pb; p += 2)
            for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
                const int64_t rows = std::min<int64_t>(kRowBlock, M - m0);
                if (p + 2 <= pb) int8_tile_rows<2>(r, m0, rows, wp, quads, cs, sc, yp, N, p);
                else int8_tile_rows<1>(r, m0, rows, wp, quads, cs, sc, yp, N, p);
            }
        return;
    }
    for (int64_t g = pa; g < pb; g += kPanelGroup) {
        const int64_t ge = std::min<int64_t>(g + kPanelGroup, pb);
        kInt8Rows[M](r, 0, wp, quads, cs, sc, yp, N, g, ge);
    }
}

void int4_worker(const Rows& r, int64_t M, const uint8_t* wp, int64_t octets, int64_t group, const uint16_t* sz,
                 float* yp, int64_t N, int64_t pa, int64_t pb) {
    if (g_amx && M >= kAmxInt4Rows && group == 32) {
        int4_amx(r, M, wp, octets, sz, yp, N, pa, pb);
        return;
    }
    if (M >= int4_many_rows() && group == 32) {
        for (int64_t p = pa; p < pb; p += 2)
            for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
                const int64_t rows = std::min<int64_t>(kRowBlock, M - m0);
                if (p + 2 <= pb) int4_tile_rows<2>(r, m0, rows, wp, octets, sz, yp, N, p);
                else int4_tile_rows<1>(r, m0, rows, wp, octets, sz, yp, N, p);
            }
        return;
    }
    for (int64_t g = pa; g < pb; g += kPanelGroup) {
        const int64_t ge = std::min<int64_t>(g + kPanelGroup, pb);
        for (int64_t m0 = 0; m0 < M; m0 += kInt4Chunk) {
            const int64_t rows = std::min<int64_t>(kInt4Chunk, M - m0);
            kInt4Rows[rows](r, m0, wp, octets, group, sz, yp, N, g, ge);
        }
    }
}

}  // namespace

// x [M, K] float32; packed int8 [Np/16, Kp/4, 64]; col_sums int32 [Np] (128 * sum_k q); scales float32 [Np];
// out_features N <= Np. Returns [M, N] float32.
at::Tensor int8_linear(at::Tensor x, const at::Tensor& packed, const at::Tensor& col_sums,
                          const at::Tensor& scales, int64_t N) {
    check_input(x, "int8_linear");
    x = x.contiguous();
    TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 64 && packed.scalar_type() == at::kChar &&
                    packed.is_contiguous() && packed.size(1) * 4 >= x.size(1) && packed.size(1) * 4 < x.size(1) + 4,
                "int8_linear: packed must be a contiguous int8 [Np/16, Kp/4, 64] tensor with Kp = x.size(1) "
                "rounded up to 4");
    const int64_t M = x.size(0), K = x.size(1), panels = packed.size(0), quads = packed.size(1);
    TORCH_CHECK(col_sums.scalar_type() == at::kInt && col_sums.is_contiguous() &&
                    col_sums.numel() == panels * 16 && scales.scalar_type() == at::kFloat &&
                    scales.is_contiguous() && scales.numel() == panels * 16 && N > panels * 16 - 16 &&
                    N <= panels * 16,
                "int8_linear: col_sums (int32) and scales (float32) must hold the packed columns, N within them");
    auto y = at::empty({M, N}, x.options());
    if (M == 0) return y;
    std::vector<uint8_t> xq(padded_rows(M) * quads * 4);
    std::vector<float> xs(M);
    prepare_rows(x.data_ptr<float>(), M, K, quads * 4, 128, xq.data(), xs.data(), 0, nullptr);
    const Rows r{xq.data(), quads * 4, xs.data(), nullptr, 0};
    const int8_t* wp = packed.data_ptr<int8_t>();
    const int32_t* cs = col_sums.data_ptr<int32_t>();
    const float* sc = scales.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, panels, kPanelGroup, [&](int64_t pa, int64_t pb) {
        int8_worker(r, M, wp, quads, cs, sc, yp, N, pa, pb);
    });
    return y;
}

// x [M, K] float32; packed uint8 [N/16, K/8, 64]; scales_zeros bfloat16 [N/16, K/group, 2, 16]. Returns [M, N].
at::Tensor int4_linear(at::Tensor x, const at::Tensor& packed, const at::Tensor& scales_zeros,
                          int64_t group) {
    check_input(x, "int4_linear");
    x = x.contiguous();
    const int64_t M = x.size(0), K = x.size(1);
    TORCH_CHECK(group > 0 && group % 8 == 0 && K % group == 0,
                "int4_linear: the group size must be a multiple of 8 that divides the input width");
    TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 64 && packed.scalar_type() == at::kByte &&
                    packed.is_contiguous() && packed.size(1) * 8 == K,
                "int4_linear: packed must be a contiguous uint8 [N/16, K/8, 64] tensor with K = x.size(1)");
    const int64_t panels = packed.size(0), octets = packed.size(1), groups = K / group, N = panels * 16;
    TORCH_CHECK(scales_zeros.scalar_type() == at::kBFloat16 && scales_zeros.is_contiguous() &&
                    scales_zeros.numel() == panels * groups * 32,
                "int4_linear: scales_zeros must be a contiguous bfloat16 [N/16, K/group, 2, 16] tensor");
    auto y = at::empty({M, N}, x.options());
    if (M == 0) return y;
    std::vector<uint8_t> xq(padded_rows(M) * K);
    std::vector<float> xs(M), sums(M * groups);
    prepare_rows(x.data_ptr<float>(), M, K, K, 0, xq.data(), xs.data(), group, sums.data());
    const Rows r{xq.data(), K, xs.data(), sums.data(), groups};
    const uint8_t* wp = packed.data_ptr<uint8_t>();
    const uint16_t* sz = reinterpret_cast<const uint16_t*>(scales_zeros.data_ptr<at::BFloat16>());
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, panels, kPanelGroup, [&](int64_t pa, int64_t pb) {
        int4_worker(r, M, wp, octets, group, sz, yp, N, pa, pb);
    });
    return y;
}

// Turn the AMX tiles on (where the CPU and Linux allow them) or off for this process's many-row passes; returns
// whether they are on. Off by default: kernels.quant_ops turns them on where kernels.quant_kernels picks 'amx'.
bool quant_amx(bool want) {
    g_amx = want && amx_available();
    return g_amx;
}

#pragma GCC pop_options
