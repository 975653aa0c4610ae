"""Model aliases and loading: hub ids, local directories, GGUF files, and the embedded SmolLM2 default.

An alias is the only name the rest of specdec uses for a model. Built-in aliases live in models.yaml next to
this file; users add or override them with a YAML file of the same shape (or the workflow config's `models:`).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import yaml

DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")
WEIGHT_FORMATS = ("float32", "bfloat16", "int8", "int4")  # quant.WEIGHT_FORMATS, spelled out: no torch import here
SOURCE_KEYS = ("package", "path", "hub")
SPEC_KEYS = {"package", "path", "hub", "gguf_file", "revision", "dtype", "weights", "trust_remote_code", "chat",
             "description"}
DEFAULT_ALIAS = "smollm2-135m"


class ModelError(ValueError):
    """A model alias is unknown or malformed, or its weights cannot be loaded here (one-line message)."""


@dataclass(frozen=True)
class ModelSpec:
    alias: str
    package: str | None = None
    path: str | None = None
    hub: str | None = None
    gguf_file: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    weights: str | None = None  # our engine's weight format after loading (quant.WEIGHT_FORMATS); None: as loaded
    trust_remote_code: bool = False
    chat: bool | str = "auto"
    description: str = ""

    @property
    def source(self) -> str:
        """Human-readable origin of the weights, recorded with every result."""
        if self.package:
            return f"package:{self.package}/{self.gguf_file}"
        if self.path:
            return f"path:{self.path}" + (f" ({self.gguf_file})" if self.gguf_file else "")
        return f"hub:{self.hub}" + (f"@{self.revision}" if self.revision else "") + (
            f" ({self.gguf_file})" if self.gguf_file else "")


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: object
    tokenizer: object
    device: str
    load_s: float = 0.0
    eos_token_ids: list[int] = field(default_factory=list)


def spec_from_dict(alias: str, entry: dict) -> ModelSpec:
    if not isinstance(entry, dict):
        raise ModelError(f"model alias '{alias}': expected a mapping with one of {SOURCE_KEYS}, got {entry!r}")
    unknown = set(entry) - SPEC_KEYS
    if unknown:
        raise ModelError(f"model alias '{alias}': unknown key(s) {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    sources = [k for k in SOURCE_KEYS if entry.get(k)]
    if len(sources) != 1:
        raise ModelError(f"model alias '{alias}': give exactly one of {SOURCE_KEYS} (got {sources or 'none'})")
    if entry.get("package") and not entry.get("gguf_file"):
        raise ModelError(f"model alias '{alias}': 'package' needs 'gguf_file' (the file inside the package)")
    dtype = entry.get("dtype", "auto")
    if dtype not in DTYPES:
        raise ModelError(f"model alias '{alias}': dtype '{dtype}' is not one of {DTYPES}")
    weights = entry.get("weights")
    if weights is not None and weights not in WEIGHT_FORMATS:
        raise ModelError(f"model alias '{alias}': weights '{weights}' is not one of {WEIGHT_FORMATS}")
    chat = entry.get("chat", "auto")
    if chat not in (True, False, "auto"):
        raise ModelError(f"model alias '{alias}': chat must be true, false or auto, not {chat!r}")
    return ModelSpec(alias=alias, package=entry.get("package"), path=entry.get("path"), hub=entry.get("hub"),
                     gguf_file=entry.get("gguf_file"), revision=entry.get("revision"), dtype=dtype,
                     weights=weights, trust_remote_code=bool(entry.get("trust_remote_code", False)), chat=chat,
                     description=entry.get("description", ""))


def builtin_registry() -> dict[str, ModelSpec]:
    text = importlib.resources.files("specdec.model").joinpath("models.yaml").read_text()
    return {alias: spec_from_dict(alias, entry) for alias, entry in yaml.safe_load(text).items()}


def load_registry(overrides: dict | str | Path | None = None) -> dict[str, ModelSpec]:
    """Built-in aliases, updated with `overrides` (a mapping or the path of a YAML file of the same shape)."""
    registry = builtin_registry()
    if overrides is None:
        return registry
    if isinstance(overrides, (str, Path)):
        path = Path(overrides)
        if not path.is_file():
            raise ModelError(f"models file '{path}' does not exist")
        try:
            overrides = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ModelError(f"models file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(overrides, dict):
            raise ModelError(f"models file '{path}' must map aliases to model entries")
    for alias, entry in overrides.items():
        registry[str(alias)] = spec_from_dict(str(alias), entry)
    return registry


def resolve(alias: str, registry: dict[str, ModelSpec]) -> ModelSpec:
    if alias not in registry:
        raise ModelError(f"unknown model alias '{alias}'; known aliases: {', '.join(sorted(registry))} "
                         "(add your own with --models FILE)")
    return registry[alias]


def package_gguf_path(spec: ModelSpec) -> Path:
    """The GGUF file inside an installed package, located with importlib (never a hard-coded path)."""
    if importlib.util.find_spec(spec.package) is None:
        raise ModelError(f"model '{spec.alias}': Python package '{spec.package}' is not installed "
                         f"(pip install {spec.package.replace('_', '-')})")
    path = Path(str(importlib.resources.files(spec.package).joinpath(spec.gguf_file)))
    if not path.is_file():
        raise ModelError(f"model '{spec.alias}': package '{spec.package}' has no file '{spec.gguf_file}'")
    return path


def _hub_is_cached(spec: ModelSpec) -> bool:
    from huggingface_hub import try_to_load_from_cache

    filename = spec.gguf_file or "config.json"
    found = try_to_load_from_cache(spec.hub, filename, revision=spec.revision)
    return isinstance(found, str)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A fast DNS + TCP probe, so an offline machine fails in seconds rather than after transformers' retries."""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True", "YES", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def availability(spec: ModelSpec) -> tuple[bool, str]:
    """Whether the weights can be loaded here without downloading, and where from (no network, no loading)."""
    try:
        if spec.package:
            return True, str(package_gguf_path(spec))
        if spec.path:
            path = Path(spec.path).expanduser()
            if path.is_file() or (path.is_dir() and (not spec.gguf_file or (path / spec.gguf_file).is_file())):
                return True, str(path)
            return False, f"local path {path} does not exist"
        if _hub_is_cached(spec):
            return True, f"hub cache ({spec.hub})"
        return False, f"{spec.hub} is not in the local Hugging Face cache (needs a hub download)"
    except ModelError as exc:
        return False, str(exc)


def unavailable_message(spec: ModelSpec, reason: str) -> str:
    return (f"weights for model '{spec.alias}' are not available here: {reason}. Download them where the hub is "
            f"reachable (huggingface-cli download {spec.hub or '<repo>'}) or point the alias at a local copy, e.g. "
            f"a models YAML with `{spec.alias}: {{path: /data/models/{spec.alias}}}` passed as --models "
            f"(or under `models:` in the workflow config)")


def torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def converted_cache_dir(gguf_path: Path, dtype: str) -> Path:
    """Dequantising SmolLM2's GGUF takes ~20 s; a safetensors copy keyed by the file's identity loads in ~1 s."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("SPECDEC_CACHE", Path.home() / ".cache" / "specdec"))
    return root / "converted" / f"{gguf_path.stem}-{key}"


def _load_gguf(gguf_path: Path, dtype: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = converted_cache_dir(gguf_path, dtype)
    if (cached / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cached)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch_dtype(dtype))
        return model, tokenizer
    kwargs = dict(gguf_file=gguf_path.name, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch_dtype(dtype), **kwargs)
    tmp = None
    try:  # write to a temporary sibling and rename, so concurrent jobs never see a half-written copy
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
        # The weights are already dequantised: save them as a plain checkpoint.
        quantizer, model.hf_quantizer = getattr(model, "hf_quantizer", None), None
        quant_config = model.config.__dict__.pop("quantization_config", None)
        try:
            model.save_pretrained(tmp)
        finally:
            model.hf_quantizer = quantizer
            if quant_config is not None:
                model.config.quantization_config = quant_config
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cached)
    except Exception as exc:  # the copy only saves time: never fail a load because of it
        print(f"specdec: note: could not cache a converted copy of {gguf_path.name} ({exc})", file=sys.stderr)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


def is_gguf(spec: ModelSpec) -> bool:
    return bool(spec.package or spec.gguf_file or (spec.path and str(spec.path).endswith(".gguf")))


def gguf_path(spec: ModelSpec) -> Path:
    """The GGUF file of a packaged, local or hub-cached GGUF alias (ModelError when it is not here)."""
    if spec.package:
        return package_gguf_path(spec)
    base = Path(spec.path).expanduser() if spec.path else None
    path = (base / spec.gguf_file if spec.gguf_file else base) if base else None
    if path is None or not path.is_file():  # hub GGUF repositories: the file lives in the hub cache
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec.hub, spec.gguf_file, revision=spec.revision) if spec.hub else None
        if not isinstance(found, str):
            raise ModelError(unavailable_message(spec, f"GGUF file {path or spec.gguf_file} is not here"))
        path = Path(found)
    return path


def checkpoint_source(spec: ModelSpec) -> tuple[str | Path, bool]:
    """Where a transformers checkpoint loads from and whether only local files may be used: the alias's
    directory, else the hub cache if it has the model, else the hub if it is reachable (ModelError otherwise)."""
    if spec.path:
        where = Path(spec.path).expanduser()
        if not where.is_dir():
            raise ModelError(unavailable_message(spec, f"local directory {where} does not exist"))
        return where, True
    if _hub_is_cached(spec):
        return spec.hub, True
    if not _hub_reachable():
        raise ModelError(unavailable_message(
            spec, f"{spec.hub} is not in the local Hugging Face cache and the hub is unreachable"))
    return spec.hub, False


def loads_local_gguf(spec: ModelSpec) -> bool:
    """Packaged or local GGUF files are dequantised once and cached (hub GGUF repos go through from_pretrained)."""
    return bool(spec.package or (spec.path and (spec.gguf_file or str(spec.path).endswith(".gguf"))))


def model_config(spec: ModelSpec):
    """The transformers config of an alias without loading weights (None for a GGUF file not yet converted)."""
    from transformers import AutoConfig

    if is_gguf(spec):
        converted = converted_cache_dir(gguf_path(spec), spec.dtype)
        return AutoConfig.from_pretrained(converted) if (converted / "config.json").is_file() else None
    where, local_only = checkpoint_source(spec)
    try:
        return AutoConfig.from_pretrained(where, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                                          local_files_only=local_only)
    except OSError as exc:
        raise ModelError(unavailable_message(spec, str(exc).splitlines()[0])) from None


def tensor_parallel_kwargs(tp_plan: str) -> dict:
    """from_pretrained arguments for a tensor-parallel load (transformers 5 takes a DistributedConfig; older
    releases took tp_plan directly)."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return {"tp_plan": tp_plan}
    return {"distributed_config": DistributedConfig(tp_plan=tp_plan)}


def load_model(spec: ModelSpec, device: str = "cpu", device_map=None, max_memory=None,
               tp_plan: str | None = None) -> LoadedModel:
    """Load weights and tokenizer for an alias; failures are ModelError with a one-line, actionable message.
    tp_plan="auto" shards the model with transformers' tensor-parallel plan (inside torchrun, see parallel.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per tensor, per load, drowns the workflow's own progress
    start = time.perf_counter()
    try:
        if loads_local_gguf(spec):
            model, tokenizer = _load_gguf(gguf_path(spec), spec.dtype, spec.trust_remote_code)
        else:
            where, local_only = checkpoint_source(spec)
            kwargs = dict(trust_remote_code=spec.trust_remote_code, revision=spec.revision,
                          local_files_only=local_only)
            if spec.gguf_file:
                kwargs["gguf_file"] = spec.gguf_file
            tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
            if device_map is not None:
                kwargs.update(device_map=device_map, max_memory=max_memory)
            if tp_plan is not None:
                kwargs.update(tensor_parallel_kwargs(tp_plan))
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype(spec.dtype), **kwargs)
    except ModelError:
        raise
    except OSError as exc:
        raise ModelError(unavailable_message(spec, str(exc).splitlines()[0])) from None
    if device_map is None and tp_plan is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if spec.weights is not None:
        # inside the function: quant imports torch, and `specdec --help` reads this module's WEIGHT_FORMATS
        from specdec.model.kernels import quant_ops
        from specdec.model.quant import WeightFormatError, apply_weights

        try:
            apply_weights(model, spec.weights, quant_ops(spec.weights))
        except WeightFormatError as exc:
            raise ModelError(f"model '{spec.alias}': {exc}") from None
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, device=str(model.device),
                       load_s=time.perf_counter() - start, eos_token_ids=eos_token_ids(model, tokenizer))


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a generation: the generation config's (may be a list) and the tokenizer's."""
    ids = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, getattr(tokenizer, "eos_token_id", None)):
        if value is None:
            continue
        ids.extend(value if isinstance(value, (list, tuple)) else [value])
    return sorted(set(int(i) for i in ids))


def check_same_vocab(target: LoadedModel, draft: LoadedModel) -> int:
    """Draft–target strategies compare token ids, so both tokenizers must map text to the same ids.

    Returns the number of logit rows both models share (embeddings are often padded to different sizes, e.g.
    Qwen2.5-7B 152064 vs 0.5B 151936); verification only looks at those rows.
    """
    t_vocab, d_vocab = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if t_vocab != d_vocab:
        differing = {tok for tok in set(t_vocab) | set(d_vocab) if t_vocab.get(tok) != d_vocab.get(tok)}
        example = sorted(differing)[:3]
        raise ModelError(f"target '{target.spec.alias}' and draft '{draft.spec.alias}' do not share a vocabulary "
                         f"({len(t_vocab)} vs {len(d_vocab)} tokens, {len(differing)} differ, e.g. {example}); "
                         "draft-target strategies need one tokenizer: pick a draft from the target's family, "
                         "or use the ngram strategy")
    t_rows = target.model.get_output_embeddings().out_features
    d_rows = draft.model.get_output_embeddings().out_features
    shared = min(t_rows, d_rows)
    if shared < len(t_vocab):
        raise ModelError(f"target '{target.spec.alias}' ({t_rows} logits) and draft '{draft.spec.alias}' "
                         f"({d_rows} logits) cannot both score the tokenizer's {len(t_vocab)} tokens")
    return shared


def shared_logit_rows(target: LoadedModel, draft: LoadedModel) -> int | None:
    """check_same_vocab, then the logit rows verification must keep: None when both heads have exactly those
    rows (nothing to slice), else the shared count."""
    shared = check_same_vocab(target, draft)
    rows = {m.model.get_output_embeddings().out_features for m in (target, draft)}
    return None if rows == {shared} else shared


def encode_prompt(loaded: LoadedModel, messages: list[dict] | str) -> list[int]:
    """Token ids for a prompt: the chat template for chat models (per the alias), raw text otherwise."""
    tok = loaded.tokenizer
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    use_chat = loaded.spec.chat is True or (loaded.spec.chat == "auto" and getattr(tok, "chat_template", None))
    if use_chat:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if hasattr(ids, "keys"):  # some tokenizer versions return a BatchEncoding despite return_dict=False
            ids = ids["input_ids"]
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(i) for i in ids]
    text = "\n\n".join(m["content"] for m in messages)
    return [int(i) for i in tok(text)["input_ids"]]
