"""Our forward (specdec/model/llama_forward.py) against transformers' forward of the same prepared model, A/B in one
process: per weight format, the embedded target's plain decoding of suite prompts, the forwards interleaved prompt
by prompt (the order rotates), medians over repeats. Where our forward runs a step's layers in one call of our
extension (kernels.decoder_layers), it also runs them looped in Python ("python loop": the same kernels from
Python, as $SPECDEC_FORWARD=own-python does). Where our forward fuses rotary, the cache write and attention
into one call (kernels.rope_attend), it also runs without that call ("unfused": the same forward, those steps in
torch), and likewise without its one-call RMSNorm ("torch norm") and SiLU-and-multiply ("torch silu"), so each
call's share is measured in the same run. Prints the CPU model, ms per one-token step and per
prefill for each, the ratio, and whether the tokens were identical (they must be: the forwards compute the same
bits; tests/test_llama_forward.py checks the logits).

    python bench/forward.py [--weights float32,int8,int4] [--per-category 1] [--max-new-tokens 64]
                            [--repeats 3] [--threads 2] [--target smollm2-135m]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from specdec import prompts

from specdec.model import decoding, models
from specdec.run.bench import default_prompts_file
from specdec.run.job import cpu_name
from specdec.model.kernels import prepare_model


# our forward without one of its fused calls (LlamaWeights' field set to None): the name printed, the field
ABLATIONS = (("python loop", "native"), ("unfused", "rope_attend"), ("torch norm", "norm_kernel"),
             ("torch silu", "swiglu"))


def decode(model, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """Greedy plain decoding with decoding.forward: (prefill s, mean step s, tokens)."""
    cache = decoding.new_cache(model, len(ids) + new_tokens + 1)
    start = time.perf_counter()
    token = int(decoding.forward(model, ids, cache)[0][0].argmax())
    prefill = time.perf_counter() - start
    tokens = [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = int(decoding.forward(model, [token], cache)[0][0].argmax())
        tokens.append(token)
    return prefill, (time.perf_counter() - start) / (new_tokens - 1), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--weights", default="float32,int8,int4")
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    registry = models.load_registry()
    suite = prompts.select(prompts.load_prompts(default_prompts_file()), per_category=args.per_category)
    print(f"CPU: {cpu_name()}, {args.threads} threads, {len(suite)} prompts x {args.repeats} repeats, "
          f"{args.max_new_tokens} new tokens")
    print(f"{'weights':10} {'step ms: ours':>14} " + " ".join(f"{name:>11}" for name, _ in ABLATIONS) +
          f" {'transformers':>13} {'ratio':>6}   {'prefill ms: ours':>17} {'transformers':>13}   same tokens")
    for fmt in args.weights.split(","):
        loaded = models.load_model(dataclasses.replace(models.resolve(args.target, registry), weights=fmt))
        model = prepare_model(loaded.model)
        own = model._specdec_own_forward
        if own is None:
            raise SystemExit(f"our forward does not apply to '{args.target}' ({fmt}): nothing to compare")
        variants = [("ours", own)] + [(name, dataclasses.replace(own, **{field: None}))
                                      for name, field in ABLATIONS if getattr(own, field) is not None]
        variants.append(("transformers", None))
        encoded = [models.encode_prompt(loaded, p["prompt"]) for p in suite]
        results = {name: [] for name, _ in variants}
        for ids in encoded[:1]:  # warm-up
            for _, forward in variants:
                model._specdec_own_forward = forward
                decode(model, ids, 8)
        same = True
        for repeat in range(args.repeats):
            for i, ids in enumerate(encoded):
                shift = (repeat + i) % len(variants)
                for name, forward in variants[shift:] + variants[:shift]:
                    model._specdec_own_forward = forward
                    results[name].append(decode(model, ids, args.max_new_tokens))
                same &= all(results[name][-1][2] == results["ours"][-1][2] for name in results)
        step = {n: 1000 * statistics.median(r[1] for r in rs) for n, rs in results.items()}
        prefill = {n: 1000 * statistics.median(r[0] for r in rs) for n, rs in results.items()}
        ablated = " ".join(f"{step[name]:11.2f}" if name in step else f"{'-':>11}" for name, _ in ABLATIONS)
        print(f"{fmt:10} {step['ours']:14.2f} {ablated} {step['transformers']:13.2f} "
              f"{step['ours'] / step['transformers']:6.2f}   {prefill['ours']:17.1f} {prefill['transformers']:13.1f}   "
              f"{'yes' if same else 'NO'}")
        model._specdec_own_forward = own
        del loaded, model


if __name__ == "__main__":
    main()
