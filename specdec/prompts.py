"""Prompt files, JSONL in one of two forms, told apart by their keys:

- specdec's own: `id`, `category`, `prompt` and optional `turns` (follow-up user turns);
- a question file as Spec-Bench (`data/spec_bench/question.jsonl`) and MT-Bench (FastChat's `question.jsonl`)
  publish them: `question_id`, `category`, `turns` (every user turn, the first is the prompt) and an optional
  `reference` (answers for judging; ignored here). Ids become strings ("81").

Spec-Bench puts MT-Bench's 80 two-turn questions (8 small categories: writing, roleplay, ...) beside its own tasks
and scores them as one task, "multi-turn conversation". So in a question file that has MT-Bench's categories
*and* others, those rows get the category `multi-turn` (the name specdec's suite uses) and keep their own as
`subcategory`; a file of MT-Bench's categories only (FastChat's MT-Bench) keeps its eight.
"""

from __future__ import annotations

import json
from pathlib import Path

KEYS = {"id", "category", "prompt", "turns"}
QUESTION_KEYS = {"question_id", "category", "turns", "reference"}
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
MULTI_TURN = "multi-turn"  # Spec-Bench's "multi-turn conversation" task; also the category of specdec's own suite


class PromptFileError(ValueError):
    """A prompt file is missing or malformed (message names the file, the line and the field)."""


def _turns(where: str, turns, key: str, minimum: int) -> list[str]:
    if not isinstance(turns, list) or len(turns) < minimum or not all(isinstance(t, str) and t.strip()
                                                                          for t in turns):
        least = "a non-empty list" if minimum else "a list"
        raise PromptFileError(f"{where}: '{key}' must be {least} of non-empty strings")
    return turns


def _own_row(where: str, item: dict) -> dict:
    unknown = set(item) - KEYS
    if unknown:
        raise PromptFileError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(KEYS)}")
    for key in ("id", "category", "prompt"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            raise PromptFileError(f"{where}: '{key}' must be a non-empty string")
    turns = _turns(where, item.get("turns", []), "turns", 0)
    return {"id": item["id"], "category": item["category"], "prompt": item["prompt"], "turns": turns}


def _question_row(where: str, item: dict) -> dict:
    unknown = set(item) - QUESTION_KEYS
    if unknown:
        raise PromptFileError(f"{where}: unknown key(s) {sorted(unknown)} in a question file (Spec-Bench/MT-Bench "
                              f"form); allowed: {sorted(QUESTION_KEYS)}")
    qid = item.get("question_id")
    if isinstance(qid, bool) or not (isinstance(qid, int) or (isinstance(qid, str) and qid.strip())):
        raise PromptFileError(f"{where}: 'question_id' must be an integer or a non-empty string")
    if not isinstance(item.get("category"), str) or not item["category"].strip():
        raise PromptFileError(f"{where}: 'category' must be a non-empty string")
    turns = _turns(where, item.get("turns"), "turns", 1)
    return {"id": str(qid), "category": item["category"], "prompt": turns[0], "turns": turns[1:]}


def load_prompts(path: str | Path) -> list[dict]:
    """The prompts of a file in either form, as dicts with `id`, `category`, `prompt`, `turns` (and `subcategory`
    for Spec-Bench's MT-Bench rows). Raises PromptFileError with one line naming file, line and problem."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file '{path}' does not exist (set `prompts:` in the config to a JSONL file)")
    prompts, seen, form = [], {}, None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(item, dict):
            raise PromptFileError(f"{where}: each line must be a JSON object with id, category and prompt "
                                  "(or question_id, category and turns)")
        row_form = "question" if "question_id" in item else "own"
        if form is None:
            form = row_form
        elif row_form != form:
            first = "question_id, category, turns" if form == "question" else "id, category, prompt"
            raise PromptFileError(f"{where}: mixes the two prompt file forms: earlier lines have {first}, this one "
                                  f"{'has' if row_form == 'question' else 'lacks'} question_id")
        row = _question_row(where, item) if form == "question" else _own_row(where, item)
        if row["id"] in seen:
            raise PromptFileError(f"{where}: duplicate prompt id '{row['id']}' (first on line {seen[row['id']]})")
        seen[row["id"]] = number
        prompts.append(row)
    if not prompts:
        raise PromptFileError(f"prompt file '{path}' has no prompts")
    return group_spec_bench(prompts) if form == "question" else prompts


def group_spec_bench(prompts: list[dict]) -> list[dict]:
    """Spec-Bench's grouping: MT-Bench's categories become `multi-turn` (their own kept as `subcategory`) when the
    file has other tasks too; a pure MT-Bench file keeps its eight categories."""
    categories = {p["category"] for p in prompts}
    if not categories & set(MT_BENCH_CATEGORIES) or categories <= set(MT_BENCH_CATEGORIES):
        return prompts
    return [{**p, "category": MULTI_TURN, "subcategory": p["category"]} if p["category"] in MT_BENCH_CATEGORIES
            else p for p in prompts]


def select(prompts: list[dict], ids: list[str] | None = None, categories: list[str] | None = None,
           per_category: int | None = None) -> list[dict]:
    """A subset by id, by category (a Spec-Bench subcategory such as `writing` selects too), and/or the first N of
    each category (order of the file is kept)."""
    known_categories = list(dict.fromkeys(c for p in prompts for c in (p["category"], p.get("subcategory")) if c))
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
        prompts = [p for p in prompts if p["category"] in set(categories) or p.get("subcategory") in set(categories)]
    if per_category:
        counts: dict[str, int] = {}
        kept = []
        for p in prompts:
            counts[p["category"]] = counts.get(p["category"], 0) + 1
            if counts[p["category"]] <= per_category:
                kept.append(p)
        prompts = kept
    return prompts
