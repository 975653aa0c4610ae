"""Prompt files: JSONL with `id`, `category`, `prompt` and optional `turns` (follow-up user turns)."""

from __future__ import annotations

import json
from pathlib import Path

KEYS = {"id", "category", "prompt", "turns"}


class PromptFileError(ValueError):
    """A prompt file is missing or malformed (message names the file, the line and the field)."""


def load_prompts(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file '{path}' does not exist (set `prompts:` in the config to a JSONL file)")
    prompts, seen = [], {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(item, dict):
            raise PromptFileError(f"{where}: each line must be a JSON object with id, category and prompt")
        unknown = set(item) - KEYS
        if unknown:
            raise PromptFileError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(KEYS)}")
        for key in ("id", "category", "prompt"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise PromptFileError(f"{where}: '{key}' must be a non-empty string")
        turns = item.get("turns", [])
        if not isinstance(turns, list) or not all(isinstance(t, str) and t.strip() for t in turns):
            raise PromptFileError(f"{where}: 'turns' must be a list of non-empty strings")
        if item["id"] in seen:
            raise PromptFileError(f"{where}: duplicate prompt id '{item['id']}' (first on line {seen[item['id']]})")
        seen[item["id"]] = number
        prompts.append({"id": item["id"], "category": item["category"], "prompt": item["prompt"], "turns": turns})
    if not prompts:
        raise PromptFileError(f"prompt file '{path}' has no prompts")
    return prompts


def select(prompts: list[dict], ids: list[str] | None = None, categories: list[str] | None = None,
           per_category: int | None = None) -> list[dict]:
    """A subset by id, by category, and/or the first N of each category (order of the file is kept)."""
    known_categories = list(dict.fromkeys(p["category"] for p in prompts))
    if ids:
        known = {p["id"] for p in prompts}
        missing = [i for i in ids if i not in known]
        if missing:
            raise PromptFileError(f"prompt id(s) {missing} are not in the prompt file")
        prompts = [p for p in prompts if p["id"] in set(ids)]
    if categories:
        missing = [c for c in categories if c not in known_categories]
        if missing:  # a typo would otherwise silently select nothing of that category
            raise PromptFileError(f"categories {missing} are not in the prompt file; its categories: "
                                  f"{', '.join(known_categories)}")
        prompts = [p for p in prompts if p["category"] in set(categories)]
    if per_category:
        counts: dict[str, int] = {}
        kept = []
        for p in prompts:
            counts[p["category"]] = counts.get(p["category"], 0) + 1
            if counts[p["category"]] <= per_category:
                kept.append(p)
        prompts = kept
    return prompts
