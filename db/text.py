"""Stored text made safe to show: control characters (ESC, NUL, newlines, DEL, C1 codes, the bidirectional
overrides) spelled out as escapes, so a name from a result file cannot drive a terminal, break a table row, or
stop an SVG/XML writer (vl-convert aborts on characters XML does not allow). Markup is escaped where each
renderer needs it (report.py: HTML and Markdown); this module only handles the characters."""

from __future__ import annotations

import re

import pandas as pd

# C0 controls (tab and newlines too: one cell, one line), DEL, C1 controls, bidirectional embeddings, overrides
# and isolates (they reorder what a terminal or browser shows), and U+FFFE/U+FFFF (not characters; XML refuses them)
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ufffe\uffff]")
NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def show_controls(text: str) -> str:
    """`text` with every CONTROL character written as an escape: `\\n`, `\\r`, `\\t`, else `\\xNN` / `\\uNNNN`."""
    return CONTROL.sub(lambda m: NAMED.get(m[0]) or (f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100
                                                     else f"\\u{ord(m[0]):04x}"), text)


def show_frame_controls(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with show_controls applied to every string cell (and to string column names); other cells untouched."""
    text_columns = [c for c in df.columns
                    if pd.api.types.is_object_dtype(df[c]) or pd.api.types.is_string_dtype(df[c])]
    out = df.assign(**{c: df[c].map(lambda v: show_controls(v) if isinstance(v, str) else v) for c in text_columns})
    return out.rename(columns=lambda c: show_controls(c) if isinstance(c, str) else c)


# Characters that start Markdown markup inside a line: emphasis, code, links and images, raw HTML and entities,
# table cells, strikethrough, math (Streamlit). A backslash makes each stand for itself (CommonMark escapes).
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>&|~$])")


def escape_markdown(text: str, keep: str = "") -> str:
    """`text` shown literally by a Markdown renderer: control characters spelled out (show_controls) and every
    MARKDOWN_SPECIAL character backslash-escaped, except those in `keep` (e.g. "`" for our own notes' code spans)."""
    return MARKDOWN_SPECIAL.sub(lambda m: m[0] if m[0] in keep else "\\" + m[0], show_controls(text))
