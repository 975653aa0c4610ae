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

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import socket
import sys
from pathlib import Path

from specdec.db.store import DEFAULT_DB, LEGACY_DB
from specdec.methods.drafters import DrafterError, DrafterSettings, drafter_dir, parse_alias, parse_for_target
from specdec.model.models import ModelError, is_gguf, load_registry, resolve
from specdec.prompts import PromptFileError, load_prompts, select
from specdec.strategies import LOOKAHEAD_DEFAULTS, STRATEGIES, is_plain_baseline


class ConfigError(ValueError):
    """A config the workflow cannot run; the message is one line naming the field and the fix."""


SAFE = re.compile(r"[^A-Za-z0-9.+-]+")


def exit_with_config_error(message: str) -> None:
    """Print one `config error: ...` line and stop Snakemake before any job. (A WorkflowError would be printed
    inside five lines of Snakemake's own wrapping: file, line and a two-frame traceback of common.smk.)"""
    print(f"config error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def load_config_file(path: str | os.PathLike) -> dict:
    """A config file as Snakemake reads it (JSON, else YAML), with a YAML syntax error reported as
    `FILE:LINE:COLUMN: ...`; Snakemake's own message names neither."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        doc = json.loads(text)
    except ValueError:
        try:
            doc = yaml.safe_load(text)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
            hint = ("; indent with spaces, not tabs" if r"'\t'" in problem
                    else "; check this line's indentation" if "<block" in problem else "")
            raise ConfigError(f"{where}: YAML syntax error: {problem}{hint}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: YAML syntax error: {' '.join(str(exc).split())}") from None
    if doc is not None and not isinstance(doc, dict):
        raise ConfigError(f"{path}: a config file is a mapping of keys (see workflow/schemas/config.schema.yaml), "
                          f"not a {type(doc).__name__}")
    try:
        check_finite(doc or {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return doc or {}


SCHEMA = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"


def check_finite(value, field: str = "") -> None:
    """Refuse NaN and infinities anywhere in a config (YAML's .nan and .inf, JSON's NaN and Infinity): JSON Schema's
    bounds let NaN through (every comparison with it is false), and no setting of the workflow means NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{field or '(top level)'}: must be a finite number, got {value}")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        check_finite(item, f"{field}.{key}" if field else str(key))


def validate_config(config: dict) -> None:
    """The config's values against workflow/schemas/config.schema.yaml (filling in its defaults, as Snakemake's
    validate does) after check_finite; ConfigError with one line naming the field."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    check_finite(config)
    try:
        validate(config, str(SCHEMA))
    except WorkflowError as exc:
        raise ConfigError(schema_error_line(exc)) from None


def check_creatable(field: str, path: str, folder: bool) -> None:
    """`path` (a file, or a folder when `folder`) exists and is writable, or can be created: a folder can be made
    in its nearest existing ancestor (tried, and removed at once: permission bits do not tell for root, /proc or a
    read-only mount). Checked before any job, so an uncreatable store fails now and not at the final ingest."""
    import tempfile

    target = Path(path).absolute()
    if target.exists():
        if folder != target.is_dir():
            raise ConfigError(f"{field}: '{path}' is a {'file' if folder else 'folder'}, not a "
                              f"{'folder' if folder else 'file'}")
        if not os.access(target, os.W_OK):
            raise ConfigError(f"{field}: '{path}' is not writable")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{field}: cannot create '{path}': '{ancestor}' is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".specdec-write-check-", dir=ancestor))
    except OSError as exc:
        raise ConfigError(f"{field}: cannot create '{path}' in '{ancestor}': {exc.strerror or exc}") from None


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


def runs_on_llamacpp(alias: str | None, registry: dict) -> bool:
    """Whether llama.cpp can run an alias: a GGUF file with no weight format of our engine set."""
    spec = registry.get(alias)
    return spec is not None and is_gguf(spec) and spec.weights is None


def drafters_root(config: dict) -> str:
    return f"{config.get('results', 'results')}/drafters"


def drafter_folder(config: dict, target: str, kind: str) -> str:
    """Where the workflow's train_drafter rule puts (and the cells find) this target's drafter."""
    return str(drafter_dir(target, kind, config.get("drafter_settings") or None, drafters_root(config)))


def check_config(config: dict) -> list[dict]:
    """Everything the schema cannot check, before any job starts. Returns the selected prompts."""
    for name in config["strategies"]:
        if name not in STRATEGIES:
            raise ConfigError(f"strategies: unknown strategy '{name}'; choose from {', '.join(STRATEGIES)}")
    try:
        registry = load_registry(config.get("models") or {})
    except (ModelError, ValueError, TypeError) as exc:
        raise ConfigError(f"models: {exc}") from None
    try:
        DrafterSettings.from_dict(config.get("drafter_settings"))
    except (DrafterError, TypeError) as exc:
        raise ConfigError(f"drafter_settings: {exc}") from None
    for i, pair in enumerate(config["pairs"]):
        try:
            trained = parse_for_target(pair.get("draft"), pair["target"])
        except DrafterError as exc:
            raise ConfigError(f"pairs[{i}].draft: {exc}") from None
        for role in ("target", "draft"):
            alias = pair.get(role)
            if alias and not (role == "draft" and trained):
                try:
                    resolve(alias, registry)
                except ModelError as exc:
                    raise ConfigError(f"pairs[{i}].{role}: {exc}") from None
    for name in config["strategies"]:
        st = STRATEGIES[name]
        if st.engine == "llamacpp" and not any(
                runs_on_llamacpp(p["target"], registry)
                and (not st.needs_draft or runs_on_llamacpp(p.get("draft"), registry)) for p in config["pairs"]):
            raise ConfigError(f"strategies: '{name}' runs llama.cpp on GGUF models, but no pair has a GGUF target"
                              + (" and draft" if st.needs_draft else "") + " without `weights`; add one (e.g. "
                              "smollm2-135m) or drop the strategy")
        if st.engine == "server":
            check_server(name, config, registry)
        if st.engine == "llamacpp" and 0 not in config["gpus"]:
            raise ConfigError(f"strategies: '{name}' runs llama.cpp on the CPU only, but gpus has no 0; add 0 to gpus "
                              "or drop the strategy")
    wanted = [s for s in config["strategies"] if STRATEGIES[s].needs_draft]
    if wanted and not any(p.get("draft") for p in config["pairs"]):
        raise ConfigError(f"strategies: {', '.join(wanted)} need a draft model, but no pair has a `draft:`; "
                          "add one to a pair or drop those strategies")
    corpus = config["generation"].get("rest_corpus")
    if corpus and any(STRATEGIES[s].proposer == "rest" for s in config["strategies"]) and not os.path.isfile(corpus):
        raise ConfigError(f"generation.rest_corpus: file '{corpus}' does not exist; give a .jsonl or text corpus, or "
                          "remove the key to use the target's own answers")
    try:
        prompts = select(load_prompts(config["prompts"]), config.get("prompt_ids"), config.get("categories"),
                         config.get("per_category"))
    except PromptFileError as exc:
        raise ConfigError(f"prompts: {exc}") from None
    if not prompts:
        raise ConfigError(f"prompts: the selection (prompt_ids/categories/per_category) leaves no prompt of "
                          f"{config['prompts']}")
    too_big = [b for b in config.get("batch_sizes", [1]) if b > len(prompts)]
    if too_big:
        raise ConfigError(f"batch_sizes: {max(too_big)} is more than the {len(prompts)} prompt(s) selected, so slots "
                          f"would stay idle; use at most {len(prompts)} or select more prompts")
    db = config.get("db", str(DEFAULT_DB))
    if Path(db) == DEFAULT_DB and LEGACY_DB.exists() and not DEFAULT_DB.exists():
        raise ConfigError(f"db: the store's default moved from {LEGACY_DB} to {DEFAULT_DB} and yours is still at the "
                          f"old place; move it (mv {LEGACY_DB}* {DEFAULT_DB.parent}/) or set db: {LEGACY_DB}")
    check_creatable("db", db, folder=False)
    check_creatable("results", config.get("results", "results"), folder=True)
    return prompts


def check_server(name: str, config: dict, registry: dict) -> None:
    """A serving strategy's server can run the config's pairs (the schema checked the keys' shapes)."""
    server = config.get("server") or {}
    kind = server.get("kind", "llama-server")
    serve = STRATEGIES[name].serve
    if serve in ("suffix", "eagle") and kind != "vllm":
        raise ConfigError(f"strategies: '{name}' is vLLM's; set server.kind: vllm or drop the strategy")
    if kind == "url" and not server.get("url"):
        raise ConfigError(f"server: kind url needs server.url (http://HOST:PORT of the running server) for '{name}'")
    if kind == "url" and config.get("baseline", "paired") == "paired" and serve != "off" \
            and not server.get("baseline_url"):
        raise ConfigError(f"server: '{name}' against a running server is paired with the same model served without "
                          "speculation: set server.baseline_url, or baseline: shared")
    if kind == "llama-server" and not any(
            runs_on_llamacpp(p["target"], registry)
            and (not STRATEGIES[name].needs_draft or runs_on_llamacpp(p.get("draft"), registry))
            for p in config["pairs"]):
        raise ConfigError(f"strategies: '{name}' runs llama-server on GGUF models, but no pair has a GGUF target"
                          + (" and draft" if STRATEGIES[name].needs_draft else "") + "; add one (e.g. smollm2-135m)"
                          " or drop the strategy")


def cell_name(target: str, draft: str | None, strategy: str, k: int | None, gpus: int, temperature: float,
              tree_budget: int | None = None, weights: str | None = None, batch_size: int = 1,
              concurrency: int | None = None, request_rate: float | None = None) -> str:
    """A file-name-safe, human-readable, unique name: e.g. `smollm2-135m__ngram__k4__g0__t0` (`__wint8` after the
    strategy when the config sets weight formats; serving cells: `__c4` clients, `__r2.5` requests/s)."""
    parts = [target] + ([draft] if draft else []) + [strategy] + ([f"w{weights}"] if weights else [])
    parts += [f"k{k}"] if k is not None else []
    parts += [f"b{tree_budget}"] if tree_budget is not None else []
    parts += [f"c{concurrency}"] if concurrency is not None else []
    parts += [f"r{request_rate:g}"] if request_rate is not None else []
    parts += [f"g{gpus}", f"t{temperature:g}"]
    parts += [f"B{batch_size}"] if batch_size != 1 else []
    return "__".join(SAFE.sub("_", p) for p in parts)


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expand_cells(config: dict) -> dict[str, dict]:
    """Cell name -> the `specdec run-job` parameters of that cell (pruned, baselines shared)."""
    gen = config["generation"]
    shared = dict(top_p=gen.get("top_p", 1.0), top_k=gen.get("top_k", 0),
                  draft_sampling=gen.get("draft_sampling", "greedy"), max_new_tokens=gen["max_new_tokens"],
                  repeats=gen.get("repeats", 1), warmup=gen.get("warmup", 1), seed=gen.get("seed", 0),
                  ngram_max=gen.get("ngram_max", 3), prompts_file=config["prompts"],
                  prompt_ids=config.get("prompt_ids"), categories=config.get("categories"),
                  per_category=config.get("per_category"), gpu_mode=config.get("gpu_mode", "pipeline"))
    if gen.get("threads"):  # only when set, so configs without it keep their cells' hashes (and results)
        shared["threads"] = gen["threads"]
    extra_models = config.get("models") or {}
    registry = load_registry(extra_models)
    cells: dict[str, dict] = {}
    for pair in config["pairs"]:
        target, draft = pair["target"], pair.get("draft")
        for strategy in config["strategies"]:
            st = STRATEGIES[strategy]
            if st.needs_draft and not draft:
                continue  # pruned: this pair has no draft model
            llama = st.engine == "llamacpp" or (st.engine == "server" and server_kind(config) == "llama-server")
            if llama and not all(runs_on_llamacpp(a, registry) for a in (target, draft if st.needs_draft else None)
                                 if a):
                continue  # pruned: llama.cpp runs GGUF files (check_config made sure some pair has them)
            cell_draft = draft if st.needs_draft else None
            trained = parse_alias(cell_draft)
            if trained and not st.takes_trained_drafter:
                continue  # pruned: e.g. hf-assisted cannot drive a drafter specdec trained itself
            ks = config["draft_lengths"] if st.uses_k else [None]
            budgets = (config.get("tree_budgets") or [None]) if st.tree else [None]
            temperatures = [float(t) for t in gen.get("temperatures", [0.0])]
            # llama.cpp runs the GGUF's own quantisation on the CPU: one weight format, no GPU cells
            formats = [None] if llama else (config.get("weights") or [None])
            gpu_counts = [0] if llama else config["gpus"]
            # llama.cpp is driven one sequence at a time; every other engine runs each batch size (transformers'
            # assisted generation and prompt lookup then fail with transformers' own refusal: shown, not hidden)
            serving = st.engine == "server"
            batch_sizes = [1] if llama or serving else config.get("batch_sizes", [1])
            if serving:  # the server's own quantisation and devices; one cell per load level (the server batches)
                formats, gpu_counts = [None], [0] if server_kind(config) == "llama-server" else gpu_counts
            loads = (list(itertools.product(config.get("concurrency") or [1], config.get("request_rate") or [None]))
                     if serving else [(None, None)])
            for k, budget, gpus, temperature, weights, batch_size, (clients, rate) in itertools.product(
                    ks, budgets, gpu_counts, temperatures, formats, batch_sizes, loads):
                name = cell_name(target, cell_draft, strategy, k, gpus, temperature, budget, weights, batch_size,
                                 clients, rate)
                cell = dict(shared, cell=name, target=target, draft=cell_draft, strategy=strategy, k=k, gpus=gpus,
                            temperature=temperature)
                if serving:  # only serving cells carry these, so other cells' hashes stay as they were
                    cell.update(concurrency=clients, request_rate=rate, server=config.get("server") or None)
                if not is_plain_baseline(strategy):  # a baseline cell is the same job in either mode
                    cell["baseline_mode"] = config.get("baseline", "paired")
                if budget is not None:  # only tree cells carry it, so other cells' hashes stay as they were
                    cell["tree_budget"] = budget
                if weights is not None:  # likewise only cells of configs that set weight formats
                    cell["weights"] = weights
                if batch_size != 1:  # likewise: cells at batch size 1 keep the hashes they had before batching
                    cell["batch_size"] = batch_size
                # a train-free proposer's own parameter: only its cells carry it (others' hashes stay as they were)
                if st.proposer == "recycling":
                    cell["recycle_topk"] = gen.get("recycle_topk", 8)
                if st.proposer == "rest":
                    cell["rest_corpus"] = gen.get("rest_corpus")
                if st.proposer == "lookahead":
                    cell.update({key: gen.get(key, default) for key, default in LOOKAHEAD_DEFAULTS.items()})
                # Only the aliases this cell uses, so editing another model's entry reruns nothing here.
                used = {a: extra_models[a] for a in (target, cell_draft) if a in extra_models}
                cell["models"] = used or None
                if config.get("degenerate"):  # only when set: cells of configs without it keep their hash
                    cell["degenerate"] = config["degenerate"]
                if trained:  # only drafter cells carry these, so other cells do not rerun when they change
                    cell["drafters_dir"] = drafters_root(config)
                    cell["drafter_settings"] = config.get("drafter_settings") or None
                # Hash of the cell's own parameters: Snakemake reruns a cell exactly when this changes.
                cell["config_hash"] = config_hash(cell)
                cells[name] = cell
    return cells


def server_kind(config: dict) -> str:
    return (config.get("server") or {}).get("kind", "llama-server")


def host_label(config: dict) -> str:
    """The host part of result paths: the config's `host`, else the machine that started the workflow.

    Cluster jobs parse the Snakefile again on their compute node; the label is handed to them in the environment
    (Slurm exports it), so their output paths are the ones the submitting Snakemake expects.
    """
    label = config.get("host") or os.environ.setdefault("SPECDEC_HOST_LABEL", socket.gethostname())
    return SAFE.sub("_", label)


def main(argv: list[str] | None = None) -> int:
    """`python workflow/matrix.py [snakemake arguments]`: check the config Snakemake will read (./config.yaml, then
    the files given with --configfile merged over it, as Snakemake merges them) before Snakemake starts: a YAML
    error with file and line (Snakemake's own message names neither), then every value against the schema, NaN
    and infinities refused. run-matrix.sh runs it first; a bad config is one `config error:` line and exit 1."""
    from snakemake.utils import update_config

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # `--config` must not match --configfile
    parser.add_argument("--configfile", "--configfiles", nargs="+", action="extend", default=[])
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    paths = (["config.yaml"] if Path("config.yaml").is_file() else []) + args.configfile
    try:
        config: dict = {}
        for path in paths:
            update_config(config, load_config_file(path))
        if paths:
            validate_config(config)
    except ConfigError as exc:
        exit_with_config_error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
