"""User text inside Markdown, made literal (`kit.escape`).

Streamlit renders Markdown in `st.markdown`, `st.caption`, `st.error`/`st.info`/... and in widget
labels: a prompt, a generated token, a typed model name or a library's message quoting one could
otherwise make links, fetch images from anywhere, turn bold, start KaTeX (`$`), open a code span
(a backtick token), colour text (`:red[...]`) or draw a table. CommonMark lets a backslash escape
every ASCII punctuation character, so all of it is escaped. Streamlit also turns bare URLs, `www.`
names and e-mail addresses into links after parsing, where escapes are gone (checked in Chromium):
an invisible WORD JOINER after `:` and `@` and inside `www.` breaks those.
"""

from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character
_WORD_JOINER = "\u2060"  # invisible, zero width: "https:⁠//x" and "a@⁠b.org" are no longer links
_LINK_STARTS = re.compile(r"(\\[:@])")
_WWW = re.compile(r"(?i)(www)(\\\.)")


def escape(text: object) -> str:
    """`text` for a Markdown string, shown exactly as typed (newlines kept as line breaks)."""
    escaped = _PUNCTUATION.sub(r"\\\1", str(text))
    escaped = _LINK_STARTS.sub(r"\1" + _WORD_JOINER, escaped)
    escaped = _WWW.sub(r"\1" + _WORD_JOINER + r"\2", escaped)
    return escaped.replace("\r\n", "\n").replace("\n", "  \n")


def unescape(markdown: str) -> str:
    """The text `escape` was given (for tests that read a page's Markdown source)."""
    text = markdown.replace("  \n", "\n").replace(_WORD_JOINER, "")
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", text)
