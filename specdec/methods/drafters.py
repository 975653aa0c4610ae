"""Trained drafters for one target: an EAGLE-style feature drafter and Medusa heads; names, folders, save/load.

Both read the target's final hidden state (the LM head's input; "feature" below) and decode through the target's
own LM head, restricted to a reduced vocabulary (the most frequent tokens of the training generations, plus the
current prompt's tokens at decode time): on a CPU the full head is a large share of a small model's cost.
Acceptance is always decided by the full target, so the reduced head can only cost acceptance, never correctness.

* EAGLE-style (Li et al. 2024, arXiv:2401.15077): one transformer layer. Input at position j: the target's feature
  F_j and the embedding of token x_{j+1}; output: a prediction of F_{j+1}, whose head gives x_{j+2}. Drafting
  further feeds the draft its own predicted features.
* Medusa (Cai et al. 2024, arXiv:2401.10774): K residual blocks on the frozen feature F_t; head i predicts x_{t+i+1}
  (the target's own head predicts x_{t+1}).

A drafter alias is `<target alias>+eagle` or `<target alias>+medusa`. Its weights live in
`<drafters root>/<target>+<kind>-<hash of the training settings>/` (model.safetensors + drafter.json); the root is
`results/drafters` unless SPECDEC_DRAFTERS_DIR or an explicit root says otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("eagle", "medusa")
FORMAT = "specdec-drafter/1"
DEFAULT_ROOT = "results/drafters"
ROOT_ENV = "SPECDEC_DRAFTERS_DIR"


class DrafterError(ValueError):
    """A drafter alias is malformed, or its drafter is not trained yet (one-line message naming the fix)."""


@dataclass(frozen=True)
class DrafterSettings:
    """Everything that changes a trained drafter; its hash names the drafter's folder."""
    prompts_file: str = "prompts/training.jsonl"  # disjoint from prompts/suite.jsonl
    gen_tokens: int = 128        # greedy target tokens generated per training prompt (the training text)
    vocab: int = 8192            # rows of the draft head (0 = the full vocabulary)
    heads: int = 4               # medusa: number of heads
    unroll: int = 2              # eagle: training passes, pass d feeding the draft its own pass d-1 predictions
    epochs: int = 8
    batch_size: int = 4
    lr: float = 3e-3
    val_every: int = 8           # every 8th training prompt is held out for the validation accuracy
    budget_minutes: float = 9.0  # training steps stop this long after the command began (see --budget-minutes)
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict | None) -> "DrafterSettings":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise DrafterError(f"unknown drafter setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


def parse_alias(alias: str | None) -> tuple[str, str] | None:
    """(target alias, kind) for a drafter alias such as `smollm2-135m+eagle`; None for an ordinary model alias."""
    if not alias or "+" not in alias:
        return None
    target, kind = alias.rsplit("+", 1)
    if kind not in KINDS or not target:
        raise DrafterError(f"drafter alias '{alias}' must be <target alias>+<kind> with kind one of {KINDS}")
    return target, kind


def parse_for_target(alias: str | None, target: str | None) -> tuple[str, str] | None:
    """parse_alias, and a drafter trained for another target is refused: it reads that target's features."""
    trained = parse_alias(alias)
    if trained and target and trained[0] != target:
        raise DrafterError(f"drafter '{alias}' is trained for target '{trained[0]}', not '{target}': use "
                           f"'{target}+{trained[1]}'")
    return trained


def drafters_root(root: str | Path | None = None) -> Path:
    return Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def settings_hash(target: str, kind: str, settings: DrafterSettings) -> str:
    """Hash of everything a drafter is trained from: target, kind, settings and the training prompts' contents
    (an edited prompt file names a new folder, so a stale drafter is never picked up)."""
    try:
        prompts = hashlib.sha256(Path(settings.prompts_file).read_bytes()).hexdigest()
    except OSError:
        prompts = None  # training will fail on the missing file; the name only has to be stable until then
    key = json.dumps({"target": target, "kind": kind, **asdict(settings), "prompts_sha256": prompts}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def drafter_dir(target: str, kind: str, settings: DrafterSettings | dict | None = None,
                root: str | Path | None = None) -> Path:
    """The folder a drafter trained with these settings lives in (the workflow names its output with this)."""
    if not isinstance(settings, DrafterSettings):
        settings = DrafterSettings.from_dict(settings)
    return drafters_root(root) / f"{target}+{kind}-{settings_hash(target, kind, settings)}"


def train_command(target: str, kind: str) -> str:
    return f"specdec train-drafter --target {target} --kind {kind}"


def find_drafter(alias: str, root: str | Path | None = None, settings: DrafterSettings | dict | None = None,
                 latest: bool = False) -> Path:
    """The folder of a trained drafter for `alias`.

    `root` is the drafters root, or one drafter's own folder (it holds drafter.json; its target and kind must be
    the alias's). In a root: with `latest` (what `specdec generate` and `bench` ask for, since they take no
    training settings), the most recently trained drafter of that target and kind, whatever its settings; else
    the folder of exactly `settings` (the workflow, which trains that folder before its cells run)."""
    target, kind = parse_alias(alias)
    given = Path(root) if root else None
    if given is not None and (given / "drafter.json").is_file():
        meta = json.loads((given / "drafter.json").read_text())
        if (meta.get("target"), meta.get("kind")) != (target, kind):
            raise DrafterError(f"{given} holds the drafter '{meta.get('target')}+{meta.get('kind')}', not "
                               f"'{alias}'")
        return given
    if latest:
        trained = trained_drafters(target, kind, root)
        folder = trained[-1] if trained else drafters_root(root) / f"{target}+{kind}-*"
    else:
        folder = drafter_dir(target, kind, settings, root)
    if not (folder / "drafter.json").is_file():
        raise DrafterError(f"drafter '{alias}' is not trained yet (no {folder}/drafter.json); train it with "
                           f"`{train_command(target, kind)}`" + (f" --drafters-dir {drafters_root(root)}"
                                                                   if root else ""))
    return folder


def trained_drafters(target: str, kind: str, root: str | Path | None = None) -> list[Path]:
    """Folders under the drafters root holding a trained drafter of this target and kind, oldest first (by the
    time drafter.json was written: a drafter folder is written whole, so that is when training finished)."""
    name = re.compile(re.escape(f"{target}+{kind}-") + r"[0-9a-f]{10}")
    folders = [p.parent for p in drafters_root(root).glob("*/drafter.json") if name.fullmatch(p.parent.name)]
    return sorted(folders, key=lambda f: ((f / "drafter.json").stat().st_mtime_ns, f.name))


# ---------------------------------------------------------------------------------------------------- modules

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotary(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    angles = positions.float()[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def causal_attend(queries: int, past: int, device=None) -> torch.Tensor:
    """bool [queries, past + queries]: query i sees the past and new positions up to itself."""
    cols = torch.arange(past + queries, device=device)
    return cols[None, :] <= (past + torch.arange(queries, device=device))[:, None]


class EagleDraft(nn.Module):
    """fc([embedding of x_{j+1}; feature F_j]) → one pre-norm transformer layer (RoPE attention, SwiGLU MLP) →
    RMSNorm → predicted F_{j+1}. Written out here (not a transformers layer) so the draft's KV cache is two tensors
    and tree masks need no framework support."""

    def __init__(self, hidden: int, heads: int, intermediate: int, rope_theta: float = 10000.0, eps: float = 1e-5,
                 vocab_ids: torch.Tensor | None = None):
        super().__init__()
        if hidden % heads or (hidden // heads) % 2:
            raise DrafterError(f"EAGLE drafter needs hidden size {hidden} divisible by {heads} heads into even dims")
        self.hidden, self.heads, self.head_dim = hidden, heads, hidden // heads
        self.intermediate, self.rope_theta, self.eps = intermediate, rope_theta, eps
        self.fc = nn.Linear(2 * hidden, hidden)
        self.attn_norm = nn.Parameter(torch.ones(hidden))
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(hidden))
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)
        self.out_norm = nn.Parameter(torch.ones(hidden))
        self.register_buffer("vocab_ids", vocab_ids if vocab_ids is not None else torch.zeros(0, dtype=torch.long))
        with torch.no_grad():  # start as "pass the feature through": the next feature resembles the current one
            self.fc.weight[:, :hidden].mul_(0.1)
            self.fc.weight[:, hidden:].copy_(torch.eye(hidden))
            self.fc.bias.zero_()

    def config(self) -> dict:
        return {"hidden": self.hidden, "heads": self.heads, "intermediate": self.intermediate,
                "rope_theta": self.rope_theta, "eps": self.eps}

    def forward(self, emb: torch.Tensor, feat: torch.Tensor, positions: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None, attend: torch.Tensor | None = None):
        """emb, feat: [B, T, H]; positions: [T]; past: (keys, values) [B, heads, P, head_dim] or None;
        attend: bool [T, P + T] or None for causal. Returns (predicted features [B, T, H], new keys, new values)."""
        b, t, _ = emb.shape
        x = self.fc(torch.cat([emb, feat], dim=-1))
        q, k, v = self.qkv(rms_norm(x, self.attn_norm, self.eps)).split(self.hidden, dim=-1)
        q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        cos, sin = rotary(positions, self.head_dim, self.rope_theta)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2))
        n_past = keys.shape[2] - t
        if attend is None and t > 1:
            attend = causal_attend(t, n_past, x.device)
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=attend)
        x = x + self.o(attn.transpose(1, 2).reshape(b, t, self.hidden))
        gate, up = self.gate_up(rms_norm(x, self.mlp_norm, self.eps)).chunk(2, dim=-1)
        x = x + self.down(F.silu(gate) * up)
        return rms_norm(x, self.out_norm, self.eps), k, v


class MedusaHeads(nn.Module):
    """Head i: F + SiLU(W_i F + b_i), then the target's LM head. W_i starts at zero, so every head starts as the
    target's own next-token head (Medusa's initialisation)."""

    def __init__(self, hidden: int, heads: int, vocab_ids: torch.Tensor | None = None):
        super().__init__()
        self.hidden, self.heads = hidden, heads
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(heads))
        for block in self.blocks:
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)
        self.register_buffer("vocab_ids", vocab_ids if vocab_ids is not None else torch.zeros(0, dtype=torch.long))

    def config(self) -> dict:
        return {"hidden": self.hidden, "heads": self.heads}

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """[..., H] → [..., heads, H]."""
        return torch.stack([feat + F.silu(block(feat)) for block in self.blocks], dim=-2)


# ------------------------------------------------------------------------------------------ drafter + target

@dataclass
class Drafter:
    """A trained module plus the frozen target pieces it decodes through."""
    kind: str
    module: nn.Module
    embed: nn.Module            # the target's input embedding
    lm_weight: torch.Tensor     # the target's LM head weight [V, H]

    def head(self, extra_ids=()) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(target token id of each head row or None for the full vocabulary, float32 weight [rows, H]).
        With a reduced vocabulary, `extra_ids` (e.g. the prompt's tokens) join it for this generation."""
        ids = self.module.vocab_ids
        if ids.numel() == 0:
            return None, self.lm_weight.float()
        if len(extra_ids):
            extra = torch.as_tensor(list(extra_ids), dtype=torch.long, device=ids.device)
            ids = torch.unique(torch.cat([ids, extra[extra < self.lm_weight.shape[0]]]))
        return ids, self.lm_weight.index_select(0, ids.to(self.lm_weight.device)).float()


def target_parts(model) -> dict:
    """Sizes the drafter modules are built from, read from a transformers causal LM's config."""
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    return {"hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
            "intermediate": getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size,
            "rope_theta": float(theta or getattr(cfg, "rope_theta", None) or 10000.0),
            "eps": float(getattr(cfg, "rms_norm_eps", None) or getattr(cfg, "layer_norm_eps", None) or 1e-5)}


def new_module(kind: str, model, vocab_ids: torch.Tensor | None, heads: int = 4) -> nn.Module:
    parts = target_parts(model)
    if kind == "eagle":
        module = EagleDraft(**parts, vocab_ids=vocab_ids)
        norm = getattr(getattr(model, "base_model", None), "norm", None)
        if norm is not None and getattr(norm, "weight", None) is not None and norm.weight.shape == (parts["hidden"],):
            with torch.no_grad():  # predicted features start on the target's feature scale (its final norm)
                module.out_norm.copy_(norm.weight.float())
        return module
    if kind == "medusa":
        return MedusaHeads(parts["hidden"], heads, vocab_ids)
    raise DrafterError(f"unknown drafter kind '{kind}'; choose one of {KINDS}")


def attach(kind: str, module: nn.Module, model) -> Drafter:
    # the drafter keeps the target's embedding and head weight: kernels.prepare_model must not repack them (a
    # second copy of the largest matrix) — it leaves a head the drafter shares on its dense weight
    model._specdec_head_shared = True
    return Drafter(kind, module, model.get_input_embeddings(), model.get_output_embeddings().weight)


def save_drafter(folder: str | Path, drafter: Drafter, meta: dict) -> Path:
    """model.safetensors + drafter.json, written to a temporary sibling and renamed (no half-written drafters)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        state = {name: t.detach().contiguous().cpu() for name, t in drafter.module.state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        document = {"format": FORMAT, "kind": drafter.kind, "config": drafter.module.config(), **meta}
        (tmp / "drafter.json").write_text(json.dumps(document, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_drafter(folder: str | Path, model) -> Drafter:
    """A saved drafter attached to its (already loaded) target model."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / "drafter.json").read_text())
    if meta.get("format") != FORMAT or meta.get("kind") not in KINDS:
        raise DrafterError(f"{folder}/drafter.json is not a {FORMAT} file (retrain the drafter)")
    state = load_file(str(folder / "model.safetensors"))
    cfg = meta["config"]
    hidden = model.config.hidden_size
    if cfg["hidden"] != hidden:
        raise DrafterError(f"drafter in {folder} was trained for hidden size {cfg['hidden']}, but the target has "
                           f"{hidden}: it belongs to another target")
    module = (EagleDraft if meta["kind"] == "eagle" else MedusaHeads)(**cfg, vocab_ids=state["vocab_ids"])
    module.load_state_dict(state)
    module.to(model.device).eval().requires_grad_(False)
    vocab = model.get_output_embeddings().out_features
    if module.vocab_ids.numel() and int(module.vocab_ids.max()) >= vocab:
        raise DrafterError(f"drafter in {folder} uses token ids beyond the target's {vocab}: another target's drafter")
    return attach(meta["kind"], module, model)
