"""The `specdec` command line: generate, models, run-job (workflow cells), ingest, query, report, prune, dashboard,
bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from specdec import __version__, fail
from specdec.model.models import WEIGHT_FORMATS
from specdec.strategies import add_proposer_args, describe

# specdec.measure.metrics.DegenerateRule's defaults, written out so `specdec --help` does not import torch
DEGENERATE_DEFAULTS = {"ngram": 4, "repeat_share": 0.5, "copy_share": 0.8}


def auto_device(name: str) -> str:
    # inside the command: `specdec query|report|ingest|--help` start without importing torch and transformers
    import torch

    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device '{name}' requested but no CUDA GPU is visible (torch.cuda.is_available() is "
                             "False); use --device cpu")
        return name
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="smollm2-135m", help="target model alias (default: %(default)s)")
    p.add_argument("--draft", default=None, help="draft model alias (speculative, hf-assisted), or a trained drafter "
                   "<target>+eagle / <target>+medusa (speculative, tree, speculative-heuristic/-confidence)")
    p.add_argument("--strategy", default="baseline",
                   help=f"one of: {describe()} (default: %(default)s)")
    p.add_argument("--k", type=int, default=None,
                   help="draft length: tokens proposed per verify pass; trees: the deepest position (default: the "
                   "strategy's own, measured best on the suite: 8 for ngram, suffix, recycling and dynamic-tree, 4 "
                   "for draft models)")
    p.add_argument("--tree-budget", type=int, default=None,
                   help="tree strategies: draft nodes verified per pass (default: k)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--draft-sampling", default="greedy", choices=["greedy", "sample"],
                   help="with temperature > 0: the draft proposes its argmax or samples (default: greedy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-cache", action="store_true", help="baseline without a KV cache (re-encode every step)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens tokens")
    p.add_argument("--ngram-max", type=int, default=3, help="ngram: longest suffix n-gram looked up (default: 3)")
    add_proposer_args(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda:N (default: auto)")
    p.add_argument("--weights", default=None, choices=WEIGHT_FORMATS,
                   help="our engine's weight format for target and draft (default: the alias's; llama.cpp strategies "
                        "run the GGUF's own)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of both engines: torch's intra-op threads and llama.cpp's (default: torch's "
                        "choice; llama.cpp spins its threads, so leave cores free for other processes)")
    p.add_argument("--warmup", type=int, default=1, help="untimed short generations before the measured one")



def read_prompt_file(path: str) -> str:
    """The whole file is the prompt; an unreadable file is a one-line error naming it."""
    # inside the command: `specdec query|report|ingest|--help` start without importing torch and transformers
    from specdec.run.runner import SettingsError

    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(f"prompt file '{path}' does not exist (--prompt-file)") from None
    except UnicodeDecodeError:
        raise SettingsError(f"prompt file '{path}' is not UTF-8 text (--prompt-file)") from None
    except OSError as exc:
        raise SettingsError(f"cannot read prompt file '{path}' (--prompt-file): {exc.strerror or exc}") from None


def prompt_of(args) -> tuple[str, list[str]]:
    """(first turn, follow-up turns) from --prompt, a text --prompt-file, or one prompt of a JSONL prompt file
    (specdec's form or a Spec-Bench/MT-Bench question file: --prompt-id, default its first prompt)."""
    # inside the command: `specdec query|report|ingest|--help` start without importing torch and transformers
    from specdec.prompts import load_prompts, select
    from specdec.run.runner import SettingsError

    if args.prompt is None and args.prompt_file is None:
        raise SettingsError("give the prompt with --prompt TEXT or --prompt-file FILE")
    if args.prompt is not None:
        prompt, turns = args.prompt, []
    elif args.prompt_file.endswith(".jsonl"):
        read_prompt_file(args.prompt_file)  # a missing or unreadable file: the same one-line errors as for text
        prompts = load_prompts(args.prompt_file)
        chosen = select(prompts, ids=[args.prompt_id]) if args.prompt_id else prompts
        prompt, turns = chosen[0]["prompt"], chosen[0]["turns"]
    else:
        prompt, turns = read_prompt_file(args.prompt_file), []
    if args.prompt_id and not (args.prompt_file or "").endswith(".jsonl"):
        raise SettingsError("--prompt-id picks a prompt of a JSONL prompt file: give --prompt-file FILE.jsonl")
    if not prompt.strip():
        raise SettingsError("the prompt is empty")
    return prompt, turns


def cmd_generate(args) -> int:
    # inside the command: `specdec query|report|ingest|--help` start without importing torch and transformers
    from specdec.measure.metrics import DegenerateRule
    from specdec.methods.drafters import find_drafter, parse_alias
    from specdec.model.decoding import DecodeSettings
    from specdec.model.models import ModelError, encode_prompt, load_registry
    from specdec.run.runner import (SettingsError, check_settings, extra_buffers_in_use, generate, load_pair,
                                    threads_in_use, use_threads, warm_up, weight_format)
    from specdec.strategies import STRATEGIES, draft_length

    s = DecodeSettings.from_mapping(args)
    if args.strategy in STRATEGIES:  # an unknown one: check_settings says so
        s = replace(s, k=draft_length(args.strategy, args.k))
    try:
        registry = load_registry(args.models)
        check_settings(args.strategy, args.draft, s, registry, args.target, weights=args.weights)
        use_threads(args.threads)
        rule = DegenerateRule.from_dict({"ngram": args.degenerate_ngram, "repeat_share": args.degenerate_repeat,
                                         "copy_share": args.degenerate_copy})
        prompt, turns = prompt_of(args)
        drafters_dir = args.drafters_dir
        if parse_alias(args.draft):  # the name means the most recently trained drafter of that target and kind
            drafters_dir = find_drafter(args.draft, args.drafters_dir, latest=True)
            print(f"specdec: drafter '{args.draft}': {drafters_dir}", file=sys.stderr)
        engine = STRATEGIES[args.strategy].engine
        if engine == "llamacpp" and args.device not in ("auto", "cpu"):
            raise SettingsError(f"'{args.strategy}' runs llama.cpp on the CPU (built without CUDA here): drop --device")
        device = "cpu" if engine == "llamacpp" else auto_device(args.device)
        pair = load_pair(args.target, args.draft, registry, device=device, drafters_dir=drafters_dir, engine=engine,
                         weights=args.weights, threads=args.threads)
        warm_up(pair, args.strategy, encode_prompt(pair.target, prompt), s, args.warmup)
        record = generate(pair, args.strategy, prompt, s, turns, rule=rule)
    except (ModelError, SettingsError, ValueError, OSError) as exc:
        return fail(str(exc))
    if args.json:
        out = {"target": args.target, "draft": args.draft, "strategy": args.strategy, "device": device,
               "engine": engine, "weights": weight_format(pair), "threads": threads_in_use(pair),
               "settings": vars(s), **record}
        if engine == "llamacpp":
            out["llamacpp_extra_buffers"] = extra_buffers_in_use(pair)
        if parse_alias(args.draft):
            out["drafter_dir"] = str(drafters_dir)
        print(json.dumps(out))
    else:
        print(record["text"])
        alpha = record["acceptance_rate"]
        print(f"[{record['new_tokens']} tokens, {record['tokens_per_s']:.1f} tok/s, TTFT {record['ttft_s']*1000:.0f} ms"
              + (f", acceptance {alpha:.2f}, {record['mean_accepted_tokens']:.2f} tokens/step" if alpha is not None
                 else "") + f", copied {record['copy_share']:.2f}, repeated {record['repeat_share']:.2f}"
              + (" DEGENERATE" if record["degenerate"] else "") + "]", file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    # inside the command: `specdec query|report|ingest|--help` start without importing torch and transformers
    from specdec.model.models import ModelError, availability, load_registry

    try:
        registry = load_registry(args.models)
    except ModelError as exc:
        return fail(str(exc))
    rows = []
    for alias, spec in sorted(registry.items()):
        ok, where = availability(spec)
        rows.append({"alias": alias, "available": ok, "source": spec.source, "dtype": spec.dtype, "detail": where})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max(len(r["alias"]) for r in rows)
    for r in rows:
        print(f"{r['alias']:<{width}}  {'yes' if r['available'] else 'no ':<3}  {r['dtype']:<8}  {r['source']}"
              + ("" if r["available"] else f"  ({r['detail']})"))
    return 0


def cmd_run_job(args) -> int:
    # The cell runs in a child `specdec run-job` (a native crash takes down only that child); only the child
    # imports torch and transformers.
    from specdec.run import isolate

    if not isolate.in_child():
        return isolate.run_job_isolated(args.job, args.out)
    isolate.enable_crash_dump()
    from specdec.run.job import run_job

    return run_job(args.job, args.out)


def cmd_train_drafter(args) -> int:
    # inside the command: `specdec query|report|ingest|--help` start without importing torch and transformers
    from specdec.methods.train import cmd_train_drafter as train
    from specdec.run import devices

    try:
        if args.device == "auto":  # a free GPU, claimed like a cell's (lock files); no GPU: an empty claim, the CPU
            gpus = devices.visible_gpus()
            claim = devices.claim_gpus(min(1, len(gpus)), gpus)
            args.device = claim.devices[0]
        else:
            claim = devices.claim_gpus(0)
            args.device = auto_device(args.device)  # before the target loads: no CUDA is a one-line error
    except (ValueError, devices.DeviceError) as exc:
        return fail(str(exc))
    try:
        return train(args)
    finally:
        claim.release()


def delegate(module: str, func: str, argv: list[str]) -> int:
    import importlib

    return importlib.import_module(module).__dict__[func](argv) or 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specdec", description="Benchmark speculative decoding of LLMs.")
    p.add_argument("--version", action="version", version=f"specdec {__version__}")
    p.add_argument("--models", default=None, metavar="FILE", help="YAML file adding or overriding model aliases")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="decode one prompt with one strategy and print the text or a JSON record")
    add_decode_args(g)
    g.add_argument("--prompt", default=None)
    g.add_argument("--prompt-file", default=None, help="a text file (the whole text is the prompt) or a JSONL prompt "
                   "file: specdec's form or a Spec-Bench/MT-Bench question.jsonl (later turns are asked after the "
                   "model's own answer)")
    g.add_argument("--prompt-id", default=None, help="which prompt of a JSONL --prompt-file (default: the first)")
    g.add_argument("--drafters-dir", default=None, metavar="DIR",
                   help="trained drafters: their root (default: $SPECDEC_DRAFTERS_DIR or results/drafters; "
                        "`<target>+<kind>` is the most recently trained one there) or one drafter's own folder")
    g.add_argument("--json", action="store_true", help="print one JSON object with every metric")
    rule = DEGENERATE_DEFAULTS
    g.add_argument("--degenerate-ngram", type=int, default=rule["ngram"], metavar="N",
                   help="n-gram length of the copy/repeat shares (default: %(default)s)")
    g.add_argument("--degenerate-repeat", type=float, default=rule["repeat_share"], metavar="SHARE",
                   help="flag the output as degenerate at this share of repeated tokens (default: %(default)s)")
    g.add_argument("--degenerate-copy", type=float, default=rule["copy_share"], metavar="SHARE",
                   help="... or at this share of tokens copied from the prompt (default: %(default)s)")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="list model aliases and whether each can be loaded here")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    j = sub.add_parser("run-job", help="run one workflow cell from a job JSON and write its result file")
    j.add_argument("--job", required=True)
    j.add_argument("--out", required=True)
    j.set_defaults(func=cmd_run_job)

    t = sub.add_parser("train-drafter", help="train an EAGLE-style drafter or Medusa heads for a target (cached)",
                       description="Defaults of the training settings: specdec.methods.drafters.DrafterSettings.")
    t.add_argument("--target", default="smollm2-135m", help="target model alias (default: %(default)s)")
    t.add_argument("--kind", required=True, help="eagle | medusa")
    t.add_argument("--budget-minutes", type=float, default=None, metavar="M",
                   help="training steps stop once M minutes have passed since the command started (default: 9). "
                        "Not cut short: loading the target, generating the training data (a target's first drafter "
                        "only, then cached; 2-3 min on 2 idle cores), at least 1 min of training, and the final "
                        "validation (seconds). So the command takes about max(M, load + data + 1 min) + validation")
    t.add_argument("--out", default=None, help="drafter folder (default: <drafters dir>/<target>+<kind>-<hash>)")
    t.add_argument("--drafters-dir", default=None,
                   help="root of the drafter cache (default: $SPECDEC_DRAFTERS_DIR or results/drafters)")
    t.add_argument("--print-dir", action="store_true", help="print the drafter folder for these settings and exit")
    t.add_argument("--force", action="store_true", help="retrain even if the folder holds a trained drafter")
    t.add_argument("--prompts-file", default=None, help="training prompts (default: prompts/training.jsonl)")
    t.add_argument("--gen-tokens", type=int, default=None, help="greedy target tokens per training prompt")
    t.add_argument("--vocab", type=int, default=None, help="draft head rows (0 = the full vocabulary)")
    t.add_argument("--heads", type=int, default=None, help="medusa heads")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--device", default="cpu", help="cpu | cuda:N | auto = a free GPU if there is one, else the CPU "
                   "(default: cpu); the drafter trains where the target is")
    t.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice; 1 is far faster on an oversubscribed CPU)")
    t.set_defaults(func=cmd_train_drafter)

    for name, help_text in (("ingest", "insert result files into the DuckDB store"),
                            ("query", "run read-only SQL against the store"),
                            ("report", "write a leaderboard report of the store (Markdown + one HTML file)"),
                            ("prune", "remove runs from the store by id, tag, host or SQL condition (--yes)"),
                            ("dashboard", "start the Streamlit dashboard"),
                            ("bench", "ours vs transformers, side by side")):
        d = sub.add_parser(name, help=help_text, add_help=False)
        d.add_argument("rest", nargs=argparse.REMAINDER)
    return p


DELEGATED = {"ingest": ("specdec.db.ingest", "main"), "query": ("specdec.db.query", "main_query"),
             "report": ("specdec.db.report", "main"), "prune": ("specdec.db.prune", "main"),
             "dashboard": ("specdec.dashboard.launch", "main"), "bench": ("specdec.run.bench", "main")}


def command_index(argv: list[str]) -> int:
    """Index of the subcommand in argv: the first word that is neither a top-level option nor --models' value."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] == "--models" else 1
    return i


def main(argv: list[str] | None = None) -> int:
    cli_run = argv is None
    argv = sys.argv[1:] if argv is None else argv
    at = command_index(argv)
    if at < len(argv) and argv[at] in DELEGATED:
        # Hand everything after the command over untouched: argparse's REMAINDER drops leading options, so
        # `specdec dashboard --db PATH` or `specdec ingest --db PATH results/` would fail to parse.
        args = build_parser().parse_args(argv[:at + 1])
        args.rest = argv[at + 1:]
    else:
        args = build_parser().parse_args(argv)
    if args.command in DELEGATED:
        module, func = DELEGATED[args.command]
        rest = list(args.rest)
        if args.models and args.command == "bench":
            rest = ["--models", args.models] + rest
        code = delegate(module, func, rest)
        if args.command in ("ingest", "query", "report", "prune") and cli_run:
            # duckdb 2.0's bindings print dozens of spurious "nanobind: leaked ..." lines at interpreter teardown;
            # these commands keep no state worth tearing down, so a real CLI run exits right after flushing.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
