"""Training drafters (`specdec train-drafter`): the target's own greedy generations over the training prompts,
its final hidden states over them, then an EAGLE-style layer or Medusa heads trained against the target's
next-token distributions.

Data: prompts/training.jsonl (256 prompts, no text shared with the benchmark suite), first turn only, through the
target's chat template; `gen_tokens` greedy tokens each, generated in batches; features computed in batches over
prompt + generation. The data is cached next to the drafters (keyed by target, prompt file contents and length),
so the second kind trains without regenerating it. Every `val_every`-th prompt is held out; the reported
validation accuracy is top-1 agreement between the drafter (through its reduced head) and the target's argmax
over the *full* vocabulary, on the generated part of the held-out prompts.

EAGLE training feeds the draft its own predictions for `unroll` passes (as EAGLE-3's "training-time test"):
pass d at position j gets the feature pass d−1 predicted at j−1 and attends exactly to what decoding at depth d+1
would see — the verified keys up to j−d and the chain of its own earlier-pass keys — so the deeper draft
positions are trained on the inputs they meet at decode time.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from specdec import fail
from specdec.model.decoding import new_cache
from specdec.methods.drafters import (KINDS, DrafterError, DrafterSettings, attach, drafter_dir, drafters_root, new_module,
                              save_drafter)
from specdec.model.models import ModelError, encode_prompt, load_model, load_registry, resolve
from specdec.prompts import PromptFileError, load_prompts

CE_WEIGHT = 1.0         # EAGLE loss = feature regression + CE_WEIGHT × cross-entropy against the target's distribution
                        # (EAGLE uses 0.1 with far more data; here top-1 agreement on held-out prompts was better
                        # with 1.0)
MIN_TRAIN_S = 60        # training steps get at least this long, whatever the budget left after data generation
GENERATE_BATCH = 64     # prompts per batched generation (on 2 cores: ~190 tok/s at 64 rows, ~140 at 32)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------- data

def data_dir(root: Path, target: str, settings: DrafterSettings, prompts_text: str) -> Path:
    key = json.dumps({"target": target, "gen_tokens": settings.gen_tokens,
                      "prompts": hashlib.sha256(prompts_text.encode()).hexdigest()}, sort_keys=True)
    return root / f"data-{target}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


@torch.inference_mode()
def generate_sequences(loaded, prompt_ids: list[list[int]], gen_tokens: int):
    """Every prompt with the target's greedy continuation, and the target's final hidden state (the LM head's
    input) at every position of it, float16 — taken from the generating forwards themselves, so no second pass.

    Generation does not stop at end-of-sequence: the target goes on with its own next turns, so every row of the
    batch yields `gen_tokens` tokens of target text for the same cost (the drafter still learns to predict the
    end-of-sequence token). A sequence holds the tokens that were fed to the target (the last generated token is
    not, but the feature that predicts it is). A plain batched greedy loop (left padding, explicit position ids):
    transformers' generate() spent ~4x the model time per step here on a CPU."""
    model = loaded.model
    device = model.device
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # similar lengths share a batch
    sequences: list[list[int] | None] = [None] * len(prompt_ids)
    features: list[torch.Tensor | None] = [None] * len(prompt_ids)
    start = time.perf_counter()
    for b in range(0, len(order), GENERATE_BATCH):
        rows = order[b:b + GENERATE_BATCH]
        width = max(len(prompt_ids[i]) for i in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):  # left padding: every row's next token goes in the same column
            ids[r, width - len(prompt_ids[i]):] = torch.tensor(prompt_ids[i])
            mask[r, width - len(prompt_ids[i]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = new_cache(model, width + gen_tokens)  # in place: DynamicCache's per-step copies cost ~30 %
        seqs = [list(prompt_ids[i]) for i in rows]
        feats: list[list[torch.Tensor]] = [[] for _ in rows]
        for step in range(gen_tokens):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True, logits_to_keep=1, output_hidden_states=True)
            hidden = out.hidden_states[-1].to(torch.float16).cpu()
            fed = ids[:, 0].tolist() if step else None  # one device sync per step, not one per row
            for r, i in enumerate(rows):
                if step == 0:
                    feats[r].append(hidden[r, width - len(prompt_ids[i]):])
                else:
                    feats[r].append(hidden[r, -1:])
                    seqs[r].append(fed[r])
            ids = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
        for r, i in enumerate(rows):
            sequences[i], features[i] = seqs[r], torch.cat(feats[r])
        log(f"  generated {min(b + GENERATE_BATCH, len(order))}/{len(order)} training answers "
            f"({time.perf_counter() - start:.0f} s)")
    return sequences, features


def training_data(loaded, settings: DrafterSettings, root: Path) -> dict:
    """Sequences, prompt lengths and features for the training prompts; cached on disk."""
    from safetensors.torch import load_file, save_file

    prompts_path = Path(settings.prompts_file)
    text = prompts_path.read_text()
    folder = data_dir(root, loaded.spec.alias, settings, text)
    if (folder / "data.json").is_file():
        meta = json.loads((folder / "data.json").read_text())
        tensors = load_file(str(folder / "data.safetensors"))
        log(f"training data: cached in {folder} ({meta['tokens']} tokens)")
    else:
        prompts = load_prompts(prompts_path)
        start = time.perf_counter()
        prompt_ids = [encode_prompt(loaded, p["prompt"]) for p in prompts]
        log(f"training data: {len(prompts)} prompts from {prompts_path}, {settings.gen_tokens} greedy tokens each")
        sequences, feats = generate_sequences(loaded, prompt_ids, settings.gen_tokens)
        lengths = [len(seq) for seq in sequences]
        tensors = {"tokens": torch.tensor([t for seq in sequences for t in seq], dtype=torch.long),
                   "lengths": torch.tensor(lengths), "prompt_lengths": torch.tensor([len(p) for p in prompt_ids]),
                   "feats": torch.cat(feats)}
        meta = {"target": loaded.spec.alias, "prompts_file": str(prompts_path),
                "prompt_ids": [p["id"] for p in prompts], "gen_tokens": settings.gen_tokens, "tokens": sum(lengths),
                "generated_tokens": sum(lengths) - sum(len(p) for p in prompt_ids),
                "generate_s": round(time.perf_counter() - start, 1)}
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "data.safetensors"))
        (folder / "data.json").write_text(json.dumps(meta, indent=1) + "\n")
        log(f"training data: {meta['tokens']} tokens ({meta['generated_tokens']} generated) in "
            f"{meta['generate_s']:.0f} s, cached in {folder}")
    lengths = tensors["lengths"].tolist()
    return {"meta": meta, "folder": str(folder), "tokens": list(tensors["tokens"].split(lengths)),
            "feats": list(tensors["feats"].split(lengths)), "prompt_lengths": tensors["prompt_lengths"].tolist()}


def reduced_vocab(token_lists: list[torch.Tensor], size: int, vocab: int, always=()) -> torch.Tensor | None:
    """The `size` most frequent token ids of the training text (plus `always`), topped up with the lowest ids
    (BPE vocabularies put frequent merges first). None = the full vocabulary."""
    if size <= 0 or size >= vocab:
        return None
    counts = torch.bincount(torch.cat(token_lists), minlength=vocab).float()
    counts += torch.linspace(0.5, 0.0, vocab)  # ties (and unseen tokens) go to lower ids
    counts[list(always)] = float("inf")
    return torch.sort(torch.topk(counts, size).indices).values


# --------------------------------------------------------------------------------------------------- training

def batches(indices: list[int], data: dict, size: int, generator: torch.Generator | None):
    """Padded batches: (tokens [B, T], feats float32 [B, T, H], valid [B, T], generated-region mask [B, T])."""
    order = [indices[i] for i in torch.randperm(len(indices), generator=generator)] if generator else indices
    for b in range(0, len(order), size):
        rows = order[b:b + size]
        tokens = pad_sequence([data["tokens"][i] for i in rows], batch_first=True)
        feats = pad_sequence([data["feats"][i].float() for i in rows], batch_first=True)
        valid = pad_sequence([torch.ones(len(data["tokens"][i]), dtype=torch.bool) for i in rows], batch_first=True)
        generated = valid.clone()  # features that predict generated tokens: from the prompt's last one on
        for r, i in enumerate(rows):
            generated[r, :data["prompt_lengths"][i] - 1] = False
        yield tokens, feats, valid, generated


def unroll_attend(length: int, depth: int) -> torch.Tensor:
    """bool [T, (depth + 1) T] for training pass `depth` (0-based) over keys [pass 0 | pass 1 | … | pass depth]:
    query j sees pass-0 keys at i <= j − depth and pass-e key i = j − depth + e (its own chain), as decoding at
    draft depth depth + 1 does."""
    j = torch.arange(length)[:, None]
    i = torch.arange(length)[None, :]
    return torch.cat([i <= j - depth] + [i == j - depth + e for e in range(1, depth + 1)], dim=1)


def on_device(batch, device) -> tuple[torch.Tensor, ...]:
    """A CPU batch moved to where the drafter trains (the device of the target's LM head)."""
    return tuple(t.to(device, non_blocking=True) for t in batch)


@torch.no_grad()
def agreement(module, logits: torch.Tensor, want: torch.Tensor, counted: torch.Tensor, full_w) -> tuple[int, int]:
    """(correct, counted): positions where the drafter's argmax, as a target token id when `full_w` is given,
    equals the target's."""
    guess = logits.argmax(-1)
    if full_w is not None and module.vocab_ids.numel():
        guess = module.vocab_ids[guess]
    return int((guess == want)[counted].sum()), int(counted.sum())


def eagle_losses(module, embed, head_w: torch.Tensor, batch, unroll: int, full_w: torch.Tensor | None = None):
    """Summed loss over the unrolled passes, plus per-pass (correct, counted) top-1 agreement with the target's
    argmax (over the full vocabulary when `full_w` is given, else over the reduced head) on generated positions.
    Runs on head_w's device (the module must be there too); the embedding may sit on another device."""
    device = head_w.device
    tokens, feats, valid, generated = on_device(batch, device)
    length = tokens.shape[1] - 1
    with torch.no_grad():
        emb = embed(tokens[:, 1:].to(embed.weight.device)).float().to(device)
        f_in, f_target = feats[:, :-1], feats[:, 1:]
        p_target = torch.softmax(f_target @ head_w.T, dim=-1)
        want = (f_target @ (full_w if full_w is not None else head_w).T).argmax(-1)
    positions = torch.arange(length, device=device)
    keys, values, total, stats = [], [], 0.0, []
    out = None
    for depth in range(unroll):
        inputs = f_in if depth == 0 else torch.cat([f_in[:, :1], out[:, :-1]], dim=1)
        past = None if depth == 0 else (torch.cat(keys, dim=2), torch.cat(values, dim=2))
        attend = None if depth == 0 else unroll_attend(length, depth).to(device)
        out, k, v = module(emb, inputs, positions, past, attend)
        keys.append(k)
        values.append(v)
        use = valid[:, 1:] & (positions >= depth)[None]
        logits = out @ head_w.T
        regression = F.smooth_l1_loss(out, f_target, reduction="none").mean(-1)[use].mean()
        ce = -(p_target * torch.log_softmax(logits, dim=-1)).sum(-1)[use].mean()
        total = total + regression + CE_WEIGHT * ce
        stats.append(agreement(module, logits, want, use & generated[:, 1:], full_w))
    return total, stats


def medusa_losses(module, head_w: torch.Tensor, batch, full_w: torch.Tensor | None = None):
    """Per head h (predicting x_{t+h+2} from F_t): cross-entropy against the target's distribution at t+h+1,
    weighted 0.8^h as in Medusa; backward is done per head (independent graphs) to bound memory."""
    tokens, feats, valid, generated = on_device(batch, head_w.device)
    stats, total = [], 0.0
    for h, block in enumerate(module.blocks):
        shift = h + 1
        if feats.shape[1] <= shift:
            stats.append((0, 0))
            continue
        f_in, f_target = feats[:, :-shift], feats[:, shift:]
        use = valid[:, shift:]
        with torch.no_grad():
            p_target = torch.softmax(f_target @ head_w.T, dim=-1)
            want = (f_target @ (full_w if full_w is not None else head_w).T).argmax(-1)
        logits = (f_in + F.silu(block(f_in))) @ head_w.T
        loss = 0.8 ** h * -(p_target * torch.log_softmax(logits, dim=-1)).sum(-1)[use].mean()
        if torch.is_grad_enabled():
            loss.backward()
        total += float(loss.detach())
        stats.append(agreement(module, logits, want, use & generated[:, shift:], full_w))
    return total, stats


def batch_loss(kind: str, drafter, head_w: torch.Tensor, batch, settings: DrafterSettings, full_w=None):
    """One batch's loss as a float, back-propagated when gradients are on, and per draft depth (correct, counted)
    top-1 agreement with the target (eagle_losses, medusa_losses)."""
    if kind == "medusa":
        return medusa_losses(drafter.module, head_w, batch, full_w)  # back-propagates head by head itself
    loss, stats = eagle_losses(drafter.module, drafter.embed, head_w, batch, settings.unroll, full_w)
    if torch.is_grad_enabled():
        loss.backward()
    return float(loss.detach()), stats


def assess(kind: str, drafter, head_w, data, indices, settings, full_w=None) -> tuple[float | None, list]:
    """Without updating anything: the mean loss over `indices`, and per draft depth the top-1 agreement with the
    target's argmax on their generated positions (over the full vocabulary with `full_w`, else the head)."""
    with torch.no_grad():
        results = [batch_loss(kind, drafter, head_w, batch, settings, full_w)
                   for batch in batches(indices, data, settings.batch_size, None)]
    # per draft depth: (correct, counted) summed over the batches
    summed = [map(sum, zip(*depth)) for depth in zip(*(per_depth for _, per_depth in results))]
    accuracy = [round(right / total, 4) if total else None for right, total in summed]
    return (sum(loss for loss, _ in results) / len(results) if results else None), accuracy


def train(kind: str, loaded, settings: DrafterSettings, data: dict, deadline: float):
    """Train a new drafter on `data`; returns (drafter, training summary)."""
    torch.manual_seed(settings.seed)
    model = loaded.model
    n = len(data["tokens"])
    val = [i for i in range(n) if settings.val_every and i % settings.val_every == settings.val_every - 1]
    train_ids = [i for i in range(n) if i not in set(val)] or val
    vocab = model.get_output_embeddings().out_features
    ids = reduced_vocab([data["tokens"][i] for i in train_ids], settings.vocab, vocab, loaded.eos_token_ids)
    module = new_module(kind, model, ids, settings.heads).float()
    drafter = attach(kind, module, model)
    head_w = drafter.head()[1].detach()
    module.to(head_w.device).train()  # trains where the target's LM head is (a GPU when the target is on one)
    optimizer = torch.optim.AdamW(module.parameters(), lr=settings.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(train_ids) / settings.batch_size)
    planned = settings.epochs * per_epoch
    warmup = min(20, planned // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, planned) / planned))))
    generator = torch.Generator().manual_seed(settings.seed)
    probe = train_ids[:2 * settings.batch_size]  # a fixed subset: the loss before and after training
    loss_before, _ = assess(kind, drafter, head_w, data, probe, settings)
    start = time.perf_counter()
    last_log, step, stop, losses = start, 0, "epochs", []
    log(f"training {kind}: {sum(p.numel() for p in module.parameters()):,} parameters, head "
        f"{head_w.shape[0]} rows, {len(train_ids)} train / {len(val)} val prompts, {planned} steps planned")
    for epoch in range(settings.epochs):
        for batch in batches(train_ids, data, settings.batch_size, generator):
            if time.perf_counter() > deadline:
                stop = "budget"
                break
            optimizer.zero_grad(set_to_none=True)
            loss, _ = batch_loss(kind, drafter, head_w, batch, settings)
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            losses.append(loss)
            if time.perf_counter() - last_log > 15 or step == planned:
                last_log = time.perf_counter()
                log(f"  epoch {epoch + 1}/{settings.epochs} step {step}/{planned} loss "
                    f"{sum(losses[-per_epoch:]) / len(losses[-per_epoch:]):.4f} ({last_log - start:.0f} s)")
        if stop == "budget":
            log(f"  budget reached after {step} steps")
            break
    train_s = time.perf_counter() - start
    module.eval().requires_grad_(False)
    loss_after, _ = assess(kind, drafter, head_w, data, probe, settings)
    _, accuracy = assess(kind, drafter, head_w, data, val, settings, full_w=drafter.lm_weight.float())
    log(f"validation top-1 agreement with the target by draft depth: {accuracy}")
    summary = {"steps": step, "planned_steps": planned, "stopped": stop, "train_s": round(train_s, 1),
               "loss_before": round(loss_before, 4), "loss_after": round(loss_after, 4),
               "val_top1_by_depth": accuracy, "val_prompts": len(val), "train_prompts": len(train_ids),
               "head_rows": int(head_w.shape[0])}
    return drafter, summary


def train_drafter(loaded, kind: str, settings: DrafterSettings, root: str | Path | None = None,
                  out: str | Path | None = None, force: bool = False, started: float | None = None) -> Path:
    """Train (unless already trained) and save; returns the drafter's folder. The budget counts from `started`
    (time.perf_counter() when the command began, so loading the target counts too; default: now)."""
    if kind not in KINDS:
        raise DrafterError(f"unknown drafter kind '{kind}'; choose one of {KINDS}")
    folder = Path(out) if out else drafter_dir(loaded.spec.alias, kind, settings, root)
    if (folder / "drafter.json").is_file() and not force:
        log(f"drafter already trained: {folder} (use --force to retrain)")
        return folder
    start = time.perf_counter()
    deadline = (start if started is None else started) + settings.budget_minutes * 60
    data = training_data(loaded, settings, drafters_root(root))  # not interrupted: a partial cache would be wrong
    deadline = max(deadline, time.perf_counter() + MIN_TRAIN_S)  # slow data generation never leaves no training
    drafter, summary = train(kind, loaded, settings, data, deadline)
    meta = {"target": loaded.spec.alias, "target_source": loaded.spec.source, "settings": asdict(settings),
            "data": {**data["meta"], "folder": data["folder"]}, "training": summary,
            "total_s": round(time.perf_counter() - start, 1)}
    save_drafter(folder, drafter, meta)
    log(f"saved {kind} drafter for {loaded.spec.alias} in {folder} ({meta['total_s']:.0f} s in total)")
    return folder


def settings_from_args(args) -> DrafterSettings:
    given = {name: getattr(args, name) for name in ("budget_minutes", "gen_tokens", "vocab", "heads", "epochs",
                                                    "prompts_file", "seed") if getattr(args, name, None) is not None}
    return replace(DrafterSettings(), **given)


def cmd_train_drafter(args) -> int:
    """`specdec train-drafter`: checks everything cheap first, then loads the target and trains."""
    started = time.perf_counter()  # --budget-minutes counts from here
    try:
        settings = settings_from_args(args)
        if args.kind not in KINDS:
            raise DrafterError(f"--kind must be one of {KINDS}, got '{args.kind}'")
        for name in ("budget_minutes", "gen_tokens", "epochs", "heads", "batch_size", "unroll"):
            if getattr(settings, name) <= 0:
                raise DrafterError(f"{name.replace('_', '-')} must be > 0, got {getattr(settings, name)}")
        if settings.vocab < 0:
            raise DrafterError(f"--vocab must be >= 0 (0 = the full vocabulary), got {settings.vocab}")
        folder = Path(args.out) if args.out else drafter_dir(args.target, args.kind, settings, args.drafters_dir)
        if args.print_dir:
            print(folder)
            return 0
        registry = load_registry(args.models)
        spec = resolve(args.target, registry)
        load_prompts(settings.prompts_file)
        if (folder / "drafter.json").is_file() and not args.force:
            log(f"drafter already trained: {folder} (use --force to retrain)")
            print(folder)
            return 0
        if args.threads:
            torch.set_num_threads(args.threads)
        loaded = load_model(spec, device=args.device)
        folder = train_drafter(loaded, args.kind, settings, args.drafters_dir, folder, args.force, started)
    except (DrafterError, ModelError, PromptFileError, OSError) as exc:
        return fail(str(exc))
    print(folder)
    return 0
