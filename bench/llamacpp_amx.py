"""What llama.cpp's extra buffer types (AMX tiles on Intel Xeons with AMX) buy: the embedded GGUF loaded twice,
with them (llama.cpp's default) and without (`use_extra_bufts = False`), plain decoding and prompt lookup, the two
loads interleaved prompt by prompt (the order alternates) in one process, medians over repeats. Prints the CPU
model, whether it has AMX, what specdec's probe decided, tok/s with and without per strategy, the ratio, and the
share of outputs identical between the two. Where the probe found that the extra buffers crash, only the run
without them is measured. On a CPU without AMX the two should agree within noise.

    python bench/llamacpp_amx.py [--per-category 1] [--max-new-tokens 64] [--repeats 3] [--threads 2]
                                 [--target smollm2-135m] [--k 4]
"""

from __future__ import annotations

import argparse
import os
import statistics

from specdec import prompts
from specdec.engines import llamacpp
from specdec.model import models
from specdec.model.decoding import DecodeSettings
from specdec.run.bench import default_prompts_file
from specdec.run.job import cpu_name

STRATEGIES = ("llamacpp-generate", "llamacpp-ngram")  # plain decoding and llama-cpp-python's prompt lookup


def load(spec, setting: str, threads: int):
    """The alias under llama.cpp with $SPECDEC_LLAMACPP_EXTRA_BUFFERS=setting (on: llama.cpp's default)."""
    os.environ[llamacpp.EXTRA_BUFFERS_ENV] = setting
    try:
        return llamacpp.load_model(spec, threads)
    finally:
        del os.environ[llamacpp.EXTRA_BUFFERS_ENV]


def decode(loaded, strategy: str, ids: list[int], s: DecodeSettings):
    return llamacpp.decode_models(strategy, loaded.model, ids, s, loaded.eos_token_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=4, help="prompt lookup: tokens proposed per pass")
    args = parser.parse_args()
    spec = models.resolve(args.target, models.load_registry())
    path = llamacpp.gguf_file(spec)
    verdict = llamacpp.extra_buffers(path, args.threads)  # auto: probes in a child on an AMX CPU
    sides = {"with": "on", "without": "off"} if not verdict.startswith("off") else {"without": "off"}
    suite = prompts.select(prompts.load_prompts(default_prompts_file()), per_category=args.per_category)
    print(f"CPU: {cpu_name()}, AMX: {'yes' if llamacpp.has_amx() else 'no'}, specdec's decision: {verdict}, "
          f"llama-cpp-python {llamacpp.llama_build()['llama_cpp_python']}, {args.threads} threads, {len(suite)} "
          f"prompts x {args.repeats} repeats, {args.max_new_tokens} new tokens, GGUF {path.name}")
    if len(sides) == 1:
        print("the extra buffers crash here (the probe's verdict): measuring without them only")
    loaded = {side: load(spec, setting, args.threads) for side, setting in sides.items()}
    s = DecodeSettings(max_new_tokens=args.max_new_tokens, k=args.k, stop_at_eos=False)
    encoded = [models.encode_prompt(loaded["without"], p["prompt"]) for p in suite]
    for side in sides:  # warm-up
        for strategy in STRATEGIES:
            decode(loaded[side], strategy, encoded[0], DecodeSettings(max_new_tokens=8, k=args.k))
    traces = {(side, strategy): [] for side in sides for strategy in STRATEGIES}
    for repeat in range(args.repeats):
        for i, ids in enumerate(encoded):
            order = list(sides) if (repeat + i) % 2 == 0 else list(sides)[::-1]
            for strategy in STRATEGIES:
                for side in order:
                    traces[side, strategy].append((i, decode(loaded[side], strategy, ids, s)))
    print(f"{'strategy':20} " + " ".join(f"{'tok/s ' + side:>15}" for side in sides)
          + ("  with/without  same tokens" if len(sides) == 2 else ""))
    for strategy in STRATEGIES:
        tps = {}
        for side in sides:
            walls = [statistics.median(t.wall_s for j, t in traces[side, strategy] if j == i)
                     for i in range(len(encoded))]
            tokens = [statistics.median(len(t.tokens) for j, t in traces[side, strategy] if j == i)
                      for i in range(len(encoded))]
            tps[side] = sum(tokens) / sum(walls)
        line = f"{strategy:20} " + " ".join(f"{tps[side]:15.1f}" for side in sides)
        if len(sides) == 2:
            pairs = zip(traces["with", strategy], traces["without", strategy])
            same = [a.tokens == b.tokens for (_, a), (_, b) in pairs]
            line += f"  {tps['with'] / tps['without']:12.2f}  {sum(same)}/{len(same)}"
        print(line)


if __name__ == "__main__":
    main()
