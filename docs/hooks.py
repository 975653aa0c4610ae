"""MkDocs hook: the reference parts of the docs, generated from the code at build time (never copied by hand).

A page holds a marker line `<!-- generated: NAME -->`; `on_page_markdown` replaces it with GENERATORS[NAME]():

- `config-keys`: every key of workflow/schemas/config.schema.yaml with its type, default and description;
- `strategies`: every strategy of the registry (specdec.strategies.STRATEGIES) with what it needs and does;
- `store-schema`: the store's tables from db/schema.py's SQLAlchemy models (columns, types, the comment on each
  column's line) and its views and macros from the comments above them in db/views.sql.

Registered in mkdocs.yml (`hooks: [docs/hooks.py]`); tests/test_docs.py calls the generators directly. The hook
reads the source files by path, so it needs only PyYAML and SQLAlchemy beside MkDocs.
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import re
import sys
import tokenize
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.M)


def load_module(name: str, path: Path):
    """Import one source file by path (registered in sys.modules: dataclasses and SQLAlchemy look it up there)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def cell(text) -> str:
    """One Markdown table cell: whitespace collapsed, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def schema_type(node: dict) -> str:
    kinds = node.get("type", "")
    kinds = " or ".join(kinds) if isinstance(kinds, list) else kinds
    if "enum" in node:
        kinds = " | ".join(f"`{v}`" for v in node["enum"])
    if kinds == "array" and "items" in node:
        kinds = f"list of {schema_type(node['items'])}"
    bounds = [f"{word} {node[key]}" for key, word in (("minimum", "≥"), ("exclusiveMinimum", ">"),
                                                     ("maximum", "≤")) if key in node]
    return kinds + (f" ({', '.join(bounds)})" if bounds else "")


def schema_rows(properties: dict, required: list, prefix: str = ""):
    """(dotted key, node, required) for every key, depth first: an object's own keys follow it."""
    for key, node in properties.items():
        name = prefix + key
        yield name, node, key in required
        for inner, suffix in ((node, "."), (node.get("items"), "[]."), (node.get("additionalProperties"), ".<name>.")):
            if isinstance(inner, dict) and "properties" in inner:  # an object's keys, a list's or a map's items'
                yield from schema_rows(inner["properties"], inner.get("required", []), name + suffix)


def config_keys_markdown(schema_path: Path = SCHEMA) -> str:
    """The config keys table, from the schema's properties, types, defaults and descriptions."""
    schema = yaml.safe_load(schema_path.read_text())
    lines = [f"Generated from `{schema_path.relative_to(ROOT)}` when the docs are built. "
             + cell(schema.get("description", "")), "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    for name, node, required in schema_rows(schema["properties"], schema.get("required", [])):
        default = "required" if required else (f"`{node['default']}`" if "default" in node else "")
        lines.append(f"| `{name}` | {cell(schema_type(node))} | {cell(default)} | {cell(node.get('description', ''))} |")
    return "\n".join(lines) + "\n"


def strategies_markdown() -> str:
    """Every strategy of the registry: engine, what it drafts with, tree or chain, its peer and what it does."""
    registry = load_module("specdec_docs_strategies", ROOT / "specdec" / "strategies.py")
    drafts = {"none": "nothing (model-free)", "model": "a draft model",
              "model-or-drafter": "a draft model or a trained drafter"}
    lines = [f"Generated from `specdec/strategies.py` ({len(registry.STRATEGIES)} strategies) when the docs are "
             "built.", "",
             "| strategy | engine | drafts with | shape | default k / tree budget | peer | what it does |",
             "|---|---|---|---|---|---|---|"]
    for s in registry.STRATEGIES.values():
        shape = "—" if not s.uses_k else (f"tree (≤ {s.width} children)" if s.tree else "chain")
        if s.length != "fixed":
            shape += f", {s.length} length"
        defaults = "—" if not s.uses_k or s.engine == "server" else (f"{s.k} / {s.k}" if s.tree else f"{s.k}")
        peer = f"`{s.peer}`" if s.peer else ""
        lines.append(f"| `{s.name}` | {s.engine} | {drafts[s.draft]} | {shape} | {defaults} | {peer} | "
                     f"{cell(s.help)} |")
    lines += ["", "Default k and tree budget: what `specdec generate` and `specdec bench` use where `--k` or "
              "`--tree-budget` is not given (the workflow's matrix always names its own); the default k of 8 is "
              f"{registry.DEFAULTS_SOURCE}."]
    return "\n".join(lines) + "\n"


def line_comments(path: Path) -> dict[int, str]:
    """Line number -> the `#` comment at the end of that line, read with Python's tokenizer."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return {t.start[0]: t.string.lstrip("# ") for t in tokens if t.type == tokenize.COMMENT}


def table_markdown(model, comments: dict[int, str], source: list[str]) -> list[str]:
    table = model.__table__
    lines = [f"#### `{table.name}`", "", cell(model.__doc__ or ""), "",
             "| column | type | key / null | note |", "|---|---|---|---|"]
    for column in table.columns:
        where = next((i + 1 for i, text in enumerate(source)
                      if re.match(rf"\s+{re.escape(column.key)}: Mapped", text)), None)
        key = "primary key" if column.primary_key else ("not null" if not column.nullable else "")
        key = ", ".join([key] * bool(key) + [f"→ {fk.target_fullname}" for fk in column.foreign_keys])
        lines.append(f"| `{column.name}` | {column.type} | {key} | {cell(comments.get(where, ''))} |")
    return lines + [""]


def sql_object_docs(sql: str) -> dict[str, str]:
    """db/views.sql's comment paragraph for each view and macro: it starts `-- name: ...` or `-- name(args): ...`
    and runs to the next such line or the first line of SQL."""
    created = re.findall(r"^CREATE OR REPLACE (?:VIEW|MACRO) (\w+)", sql, re.M)
    docs, current = {name: "" for name in created}, None
    for line in sql.splitlines():
        if not line.startswith("--"):
            current = None
            continue
        text = line[2:].strip()
        start = re.match(r"(\w+)(\([^)]*\))?: ", text)
        if start and start.group(1) in docs:
            current = start.group(1)
        if current:
            docs[current] += " " + text
    return docs


def store_schema_markdown() -> str:
    """Tables from db/schema.py (SQLAlchemy), then views and macros from db/views.sql's comments."""
    path = ROOT / "db" / "schema.py"
    schema = load_module("specdec_docs_schema", path)
    comments, source = line_comments(path), path.read_text().splitlines()
    models = [m.class_ for m in schema.Base.registry.mappers]
    lines = ["Generated from `db/schema.py` and `db/views.sql` when the docs are built.", "", "### Tables", ""]
    for model in sorted(models, key=lambda m: inspect.getsourcelines(m)[1]):  # in the file's order
        lines += table_markdown(model, comments, source)
    lines += ["### Views and macros", "", "| name | what it holds |", "|---|---|"]
    for name, doc in sql_object_docs((ROOT / "db" / "views.sql").read_text()).items():
        lines.append(f"| `{name}` | {cell(doc) or 'a helper (no comment of its own in db/views.sql)'} |")
    return "\n".join(lines) + "\n"


GENERATORS = {"config-keys": config_keys_markdown, "strategies": strategies_markdown,
              "store-schema": store_schema_markdown}


def expand(markdown: str, page: str) -> str:
    def replace(match):
        name = match.group(1)
        if name not in GENERATORS:
            raise ValueError(f"{page}: unknown marker <!-- generated: {name} -->; known: {', '.join(GENERATORS)}")
        return GENERATORS[name]()
    return MARKER.sub(replace, markdown)


def on_page_markdown(markdown, page, config, files):  # MkDocs hook
    return expand(markdown, page.file.src_uri)
