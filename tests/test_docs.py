"""The documentation site's generated pages (docs/hooks.py) hold every config key, strategy and store table, and
mkdocs.yml's nav lists exactly the pages under docs/. Reads files only: no MkDocs needed, well under a second."""

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from specdec.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks_under_test", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def schema_keys(node: dict) -> set[str]:
    """Every property name anywhere in a JSON schema (objects, list items, maps' values)."""
    keys = set()
    for key, child in node.get("properties", {}).items():
        keys.add(key)
        keys |= schema_keys(child)
    for inner in ("items", "additionalProperties"):
        if isinstance(node.get(inner), dict):
            keys |= schema_keys(node[inner])
    return keys


def table_keys(markdown: str) -> set[str]:
    """The last dotted part of each key in the first column of the generated table."""
    return {re.split(r"\.|\[\]\.", key)[-1] for key in re.findall(r"^\| `([^`]+)` \|", markdown, re.M)}


def test_the_config_page_has_every_schema_key_with_its_description(hooks):
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    page = hooks.config_keys_markdown()
    keys = schema_keys(schema)
    assert len(keys) > 60  # the walk found the nested keys too (generation.*, noise.*, models' fields ...)
    assert keys - table_keys(page) == set()
    assert schema["properties"]["baseline"]["description"].split()[0] in page
    assert "| `generation.lookahead_window` | integer (≥ 1) | `5` |" in page
    assert "| `pairs[].target` | string | required |" in page


def test_the_strategies_page_has_every_registered_strategy_and_its_description(hooks):
    page = hooks.strategies_markdown()
    assert set(STRATEGIES) - table_keys(page) == set()
    for strategy in STRATEGIES.values():
        assert " ".join(strategy.help.split()).replace("|", "\\|") in page, strategy.name


def test_the_store_page_has_every_table_column_and_view(hooks):
    from specdec.db import schema

    page = hooks.store_schema_markdown()
    for table in schema.Base.metadata.tables.values():
        assert f"#### `{table.name}`" in page
        section = page.split(f"#### `{table.name}`")[1].split("####")[0]
        assert {c.name for c in table.columns} - table_keys(section) == set(), table.name
    views = re.findall(r"^CREATE OR REPLACE (?:VIEW|MACRO) (\w+)", (ROOT / "db" / "views.sql").read_text(), re.M)
    assert {"speedup", "cell_summary", "run_noise", "failures"} <= set(views)
    assert set(views) - table_keys(page) == set()
    # the comment on a column's line and the paragraph above a view come along
    assert "| `gpu_names` | TEXT |  | JSON list as text |" in page
    assert re.search(r"\| `cell_summary` \| cell_summary: one row per cell", page)


def test_every_marker_names_a_generator_and_every_generator_is_used(hooks):
    used = set()
    for page in DOCS.glob("*.md"):
        used |= set(hooks.MARKER.findall(page.read_text()))
    assert used == set(hooks.GENERATORS)
    with pytest.raises(ValueError, match="unknown marker <!-- generated: nope -->"):
        hooks.expand("text\n<!-- generated: nope -->\n", "x.md")
    assert "<!-- generated" not in hooks.expand("<!-- generated: strategies -->", "x.md")


def nav_files(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in nav_files(value)]
    return [f for item in nav for f in nav_files(item)]


def test_the_nav_lists_exactly_the_pages_under_docs():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = nav_files(config["nav"])
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert sorted(listed) == sorted(set(listed)), "a page is listed twice"
    assert set(listed) - on_disk == set(), "mkdocs.yml's nav names a page that docs/ does not have"
    assert on_disk - set(listed) == set(), "a page under docs/ is missing from mkdocs.yml's nav: add it there"
    assert config["theme"]["font"] is False  # nothing fetched from Google Fonts
