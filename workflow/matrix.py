"""The benchmark matrix: check a validated config against what specdec knows, then expand it into cells.

Imported by the Snakefile (workflow/rules/common.smk) and by the tests; it holds no decoding logic. A cell is one
job: one target (and draft), one strategy, one k, one GPU count and one temperature, decoding every selected prompt
`repeats` times. Cells that make no sense are pruned rather than run: a baseline has no draft and no k, a
model-free strategy (`ngram`, `hf-ngram`) ignores the pair's draft, and a draft strategy needs a pair with a draft.
Baseline cells carry no draft in their name, so every pair with the same target, GPU count and sampling settings
shares one baseline job. With `baseline: paired` (the default) every other cell also decodes the baseline inside
its own job, so speedups need no baseline cell; a `baseline` listed in strategies still runs, as a measurement of
its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket


class ConfigError(ValueError):
    """A config the workflow cannot run; the message is one line naming the field and the fix."""


# Strategies that take no k: their cells have k = None, whatever draft_lengths says.
NO_K = ("baseline", "hf-generate")
SAFE = re.compile(r"[^A-Za-z0-9.+-]+")


def schema_error_line(exc: BaseException) -> str:
    """One line from snakemake.utils.validate's error (a WorkflowError wrapping a jsonschema ValidationError)."""
    import jsonschema

    inner = exc  # Snakemake raises its WorkflowError while handling the ValidationError: walk the chain to it
    while inner is not None and not isinstance(inner, jsonschema.ValidationError):
        inner = inner.__cause__ or inner.__context__
    if inner is None:
        return " ".join(str(exc).split())
    field = ".".join(str(p) for p in inner.absolute_path) or "(top level)"
    message = inner.message
    if inner.validator == "additionalProperties":
        message = f"{message}; see workflow/schemas/config.schema.yaml for the allowed keys"
    return f"{field}: {message}"


def strategy_table():
    """(all strategies, those that need a draft, those that take k) from the engine, the single source."""
    from specdec import runner

    return tuple(runner.STRATEGIES), tuple(runner.NEEDS_DRAFT), tuple(runner.USES_K)


def trained_drafter(alias: str | None):
    """(target, kind) when a draft alias names a drafter specdec trains itself (`<target>+eagle|medusa`)."""
    from specdec.drafters import parse_alias

    return parse_alias(alias)


def drafter_strategies() -> tuple:
    from specdec import runner

    return tuple(runner.TRAINED_DRAFTER_STRATEGIES)


def drafters_root(config: dict) -> str:
    return f"{config.get('results', 'results')}/drafters"


def drafter_folder(config: dict, target: str, kind: str) -> str:
    """Where the workflow's train_drafter rule puts (and the cells find) this target's drafter."""
    from specdec.drafters import drafter_dir

    return str(drafter_dir(target, kind, config.get("drafter_settings") or None, drafters_root(config)))


def check_config(config: dict) -> list[dict]:
    """Everything the schema cannot check, before any job starts. Returns the selected prompts."""
    from specdec.models import ModelError, load_registry, resolve
    from specdec.prompts import PromptFileError, load_prompts, select

    strategies, needs_draft, _ = strategy_table()
    for name in config["strategies"]:
        if name not in strategies:
            raise ConfigError(f"strategies: unknown strategy '{name}'; choose from {', '.join(strategies)}")
    try:
        registry = load_registry(config.get("models") or {})
    except (ModelError, ValueError, TypeError) as exc:
        raise ConfigError(f"models: {exc}") from None
    from specdec.drafters import DrafterError, DrafterSettings

    try:
        DrafterSettings.from_dict(config.get("drafter_settings"))
    except (DrafterError, TypeError) as exc:
        raise ConfigError(f"drafter_settings: {exc}") from None
    for i, pair in enumerate(config["pairs"]):
        try:
            trained = trained_drafter(pair.get("draft"))
        except DrafterError as exc:
            raise ConfigError(f"pairs[{i}].draft: {exc}") from None
        if trained and trained[0] != pair["target"]:
            raise ConfigError(f"pairs[{i}].draft: drafter '{pair['draft']}' is trained for '{trained[0]}', not for "
                              f"the pair's target '{pair['target']}'; use '{pair['target']}+{trained[1]}'")
        for role in ("target", "draft"):
            alias = pair.get(role)
            if alias and not (role == "draft" and trained):
                try:
                    resolve(alias, registry)
                except ModelError as exc:
                    raise ConfigError(f"pairs[{i}].{role}: {exc}") from None
    if any(s in needs_draft for s in config["strategies"]) and not any(p.get("draft") for p in config["pairs"]):
        wanted = [s for s in config["strategies"] if s in needs_draft]
        raise ConfigError(f"strategies: {', '.join(wanted)} need a draft model, but no pair has a `draft:`; "
                          "add one to a pair or drop those strategies")
    try:
        prompts = select(load_prompts(config["prompts"]), config.get("prompt_ids"), config.get("categories"),
                         config.get("per_category"))
    except PromptFileError as exc:
        raise ConfigError(f"prompts: {exc}") from None
    if not prompts:
        raise ConfigError(f"prompts: the selection (prompt_ids/categories/per_category) leaves no prompt of "
                          f"{config['prompts']}")
    return prompts


def cell_name(target: str, draft: str | None, strategy: str, k: int | None, gpus: int, temperature: float) -> str:
    """A file-name-safe, human-readable, unique name: e.g. `smollm2-135m__ngram__k4__g0__t0`."""
    parts = [target] + ([draft] if draft else []) + [strategy] + ([f"k{k}"] if k is not None else [])
    parts += [f"g{gpus}", f"t{temperature:g}"]
    return "__".join(SAFE.sub("_", p) for p in parts)


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expand_cells(config: dict) -> dict[str, dict]:
    """Cell name -> the `specdec run-job` parameters of that cell (pruned, baselines shared)."""
    _, needs_draft, uses_k = strategy_table()
    gen = config["generation"]
    shared = dict(top_p=gen.get("top_p", 1.0), top_k=gen.get("top_k", 0),
                  draft_sampling=gen.get("draft_sampling", "greedy"), max_new_tokens=gen["max_new_tokens"],
                  repeats=gen.get("repeats", 1), warmup=gen.get("warmup", 1), seed=gen.get("seed", 0),
                  ngram_max=gen.get("ngram_max", 3), prompts_file=config["prompts"],
                  prompt_ids=config.get("prompt_ids"), categories=config.get("categories"),
                  per_category=config.get("per_category"), gpu_mode=config.get("gpu_mode", "pipeline"))
    extra_models = config.get("models") or {}
    cells: dict[str, dict] = {}
    for pair in config["pairs"]:
        target, draft = pair["target"], pair.get("draft")
        for strategy in config["strategies"]:
            if strategy in needs_draft and not draft:
                continue  # pruned: this pair has no draft model
            cell_draft = draft if strategy in needs_draft else None
            trained = trained_drafter(cell_draft)
            if trained and strategy not in drafter_strategies():
                continue  # pruned: e.g. hf-assisted cannot drive a drafter specdec trained itself
            ks = config["draft_lengths"] if strategy in uses_k else [None]
            for k in ks:
                for gpus in config["gpus"]:
                    for temperature in gen.get("temperatures", [0.0]):
                        name = cell_name(target, cell_draft, strategy, k, gpus, float(temperature))
                        cell = dict(shared, cell=name, target=target, draft=cell_draft, strategy=strategy,
                                    k=k, gpus=gpus, temperature=float(temperature))
                        if strategy != "baseline":  # a baseline cell is the same job in either mode
                            cell["baseline_mode"] = config.get("baseline", "paired")
                        # Only the aliases this cell uses, so editing another model's entry reruns nothing here.
                        used = {a: extra_models[a] for a in (target, cell_draft) if a in extra_models}
                        cell["models"] = used or None
                        if trained:  # only drafter cells carry these, so other cells do not rerun when they change
                            cell["drafters_dir"] = drafters_root(config)
                            cell["drafter_settings"] = config.get("drafter_settings") or None
                        # Hash of the cell's own parameters: Snakemake reruns a cell exactly when this changes.
                        cell["config_hash"] = config_hash(cell)
                        cells[name] = cell
    return cells


def host_label(config: dict) -> str:
    """The host part of result paths: the config's `host`, else the machine that started the workflow.

    Cluster jobs parse the Snakefile again on their compute node; the label is handed to them in the environment
    (Slurm exports it), so their output paths are the ones the submitting Snakemake expects.
    """
    label = config.get("host") or os.environ.setdefault("SPECDEC_HOST_LABEL", socket.gethostname())
    return SAFE.sub("_", label)
