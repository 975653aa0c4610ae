"""The AMX tile unit's own rate on this CPU: one core's 16 x 16 int8 tile multiplies (TDPBUSD) back to back, four
independent accumulators, operands resident in tile registers, with the multiply's depth K at 64 bytes (a full
tile: int8 weights) and at 32 (Q4_1's groups of 32 inputs, each with its own scale, which is how our int4 kernel
runs them, csrc/quant_linear.cpp:int4_amx); then the same multiplies with a tile store after each (the int4
kernel's float epilogue reads every group's sums from memory). Prints ns per multiply and int8 GOP/s, and what the
multiplies alone cost for 16 rows over SmolLM2-135M's decoder matrices in int4, against our measured int4 pass
(bench/quant_kernel.py). The evidence behind docs/kernels.md's case on the 16-row goal.

    python bench/amx_tile_rate.py [--iterations 2000000]
"""

from __future__ import annotations

import argparse

from specdec.model import kernels
from specdec.run.job import cpu_name

SOURCE = r"""
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <chrono>
#include <cstdint>
#include <cstring>
#pragma GCC target("amx-tile,amx-int8")
namespace {
struct alignas(64) TileConfig { uint8_t palette = 1, start_row = 0, reserved[14] = {}; uint16_t colsb[16] = {};
                                uint8_t rows[16] = {}; };
alignas(64) int8_t a[2][16][64];
alignas(64) uint8_t b[2][16][64];
alignas(64) int32_t c[16][16];
}
// Seconds per tile multiply of 16 x k_bytes by k_bytes x 16 (k_bytes 64 or 32), `iterations` x 4 of them;
// with store_each, every multiply starts from a zeroed tile and its sums are stored, as int4_amx does per group.
double tile_seconds(int64_t k_bytes, int64_t iterations, bool store_each) {
    syscall(SYS_arch_prctl, 0x1023, 18);  // ARCH_REQ_XCOMP_PERM for the tile data
    TileConfig cfg;
    for (int t = 0; t < 4; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    for (int t = 4; t < 6; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = static_cast<uint16_t>(k_bytes); }
    for (int t = 6; t < 8; ++t) { cfg.rows[t] = static_cast<uint8_t>(k_bytes / 4); cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
    _tile_loadd(4, a[0], 64); _tile_loadd(5, a[1], 64); _tile_loadd(6, b[0], 64); _tile_loadd(7, b[1], 64);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    const auto start = std::chrono::steady_clock::now();
    if (store_each) {
        for (int64_t i = 0; i < iterations; ++i) {
            _tile_zero(0); _tile_dpbusd(0, 4, 6); _tile_stored(0, c, 64);
            _tile_zero(1); _tile_dpbusd(1, 4, 7); _tile_stored(1, c, 64);
            _tile_zero(2); _tile_dpbusd(2, 5, 6); _tile_stored(2, c, 64);
            _tile_zero(3); _tile_dpbusd(3, 5, 7); _tile_stored(3, c, 64);
        }
    } else {
        for (int64_t i = 0; i < iterations; ++i) {
            _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
        }
    }
    _tile_stored(0, c, 64);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    _tile_release();
    return s / (4.0 * iterations);
}
"""

DECODER_WEIGHTS = 30 * (960 * 576 + 576 * 576 + 3072 * 576 + 576 * 1536)  # the 120 fused matrices' weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=2_000_000)
    args = p.parse_args()
    problem = kernels.amx_problem()
    if problem:
        raise SystemExit(f"no AMX tiles here: {problem}")
    from torch.utils import cpp_extension

    ext = cpp_extension.load_inline("specdec_amx_tile_rate", cpp_sources=[SOURCE], functions=["tile_seconds"],
                                    extra_cflags=["-O2"], verbose=False)
    print(f"{cpu_name()}, one core, {args.iterations * 4} tile multiplies each")
    rates = {}
    for k in (64, 32):
        for store in (False, True):
            ext.tile_seconds(k, args.iterations // 10, store)  # warm-up
            seconds = min(ext.tile_seconds(k, args.iterations, store) for _ in range(3))
            rates[k, store] = seconds
            print(f"  K {k:2d}{' + zero and store' if store else '':18s} {1e9 * seconds:6.2f} ns a multiply, "
                  f"{2 * 16 * 16 * k / seconds / 1e9:7.0f} int8 GOP/s")
    units = DECODER_WEIGHTS // (16 * 32)  # (16 columns, one group of 32) blocks: one multiply per 16 rows each
    print(f"int4 in groups of 32, 16 rows, SmolLM2-135M's decoder matrices: {units} multiplies, "
          f"{1e3 * units * rates[32, False] / 2:.2f} ms on 2 cores for the multiplies alone, "
          f"{1e3 * units * rates[32, True] / 2:.2f} ms with each group's sums stored")


if __name__ == "__main__":
    main()
