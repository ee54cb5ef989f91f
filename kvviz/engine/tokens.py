"""How kvviz shows a token: one place, used by the trace, every figure label, the top-k and hovers.

A byte-level tokenizer (GPT-2's BPE, the bundled model's) often splits one character into several
tokens: "中" is the three bytes E4 B8 AD, and a token may hold only the first one. Decoding such a
token alone gives "�", so 33 of 44 labels of a Chinese/emoji prompt read "�". kvviz shows the
bytes instead, as `<0xE4>`, and the characters a run of byte pieces forms together
(`merged_characters`) go into hovers.

- `token_text(tokenizer, id)`: a token's text, any incomplete UTF-8 byte written as `<0xE4>`;
- `show_token(text)`: whitespace made visible (␣ ⏎ ⇥, ∅ for empty), for labels;
- `token_labels(texts, start)`: unique axis labels "12 ␣the" (Plotly merges equal categories);
- `merged_characters(texts)`: for each token, the text its run of byte pieces decodes to.

No torch here: figures import this module.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _hex_bytes(error: UnicodeError) -> tuple[str, int]:
    """codecs error handler: each undecodable byte becomes `<0xE4>`."""
    if not isinstance(error, UnicodeDecodeError):
        raise error
    bad = error.object[error.start : error.end]
    return "".join(f"<0x{b:02X}>" for b in bad), error.end


codecs.register_error("kvviz-hex", _hex_bytes)


def bytes_text(data: bytes) -> str:
    """UTF-8 text of `data`, every byte that is not part of a whole character written as `<0xE4>`."""
    return data.decode("utf-8", errors="kvviz-hex")


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _is_byte_level(tokenizer: Any) -> bool:
    """Does the tokenizer's decoder map GPT-2's byte alphabet back to bytes (ByteLevel)?"""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


def token_bytes(tokenizer: Any, token_id: int) -> bytes | None:
    """The bytes one token stands for, when the tokenizer works on bytes; else None.

    Byte-level BPE: the token's piece in GPT-2's byte alphabet. SentencePiece byte fallback:
    pieces spelled `<0xE4>`. Anything else (whole-word pieces, special tokens): None.
    """
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(piece, str) or not piece:
        return None
    match = BYTE_PIECE.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    if _is_byte_level(tokenizer):
        alphabet = _byte_level_alphabet()
        if all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
    return None


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token's text for display: its characters, any incomplete UTF-8 byte as `<0xE4>` (never "�")."""
    token_id = int(token_id)
    if token_id in set(getattr(tokenizer, "all_special_ids", ()) or ()):
        return tokenizer.decode([token_id])
    data = token_bytes(tokenizer, token_id)
    if data is not None:
        return bytes_text(data)
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:  # an unknown scheme that still split a character: show its raw piece
        piece = tokenizer.convert_ids_to_tokens(token_id)
        return piece if isinstance(piece, str) and piece else text
    return text


def show_token(token: str) -> str:
    """Make whitespace visible: leading spaces as ␣, newlines as ⏎, tabs as ⇥, empty as ∅."""
    if token == "":
        return "∅"
    return token.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "␣")


def token_labels(tokens: Sequence[str], start: int = 0) -> list[str]:
    """Unique axis labels: position then the visible token ("12 ␣the")."""
    return [f"{start + i} {show_token(t)}" for i, t in enumerate(tokens)]


def _as_bytes(text: str) -> tuple[bytes, bool]:
    """(the bytes a display text stands for, whether it held any `<0xNN>` piece)."""
    out, pos, had = bytearray(), 0, False
    for m in BYTE_PIECE.finditer(text):
        out += text[pos : m.start()].encode("utf-8")
        out.append(int(m.group(1), 16))
        pos, had = m.end(), True
    out += text[pos:].encode("utf-8")
    return bytes(out), had


def _characters(data: bytes) -> list[tuple[str, int, int]]:
    """Split bytes into (character, first byte, end byte); a byte that starts no whole character
    is its own `<0xNN>` piece."""
    out, i = [], 0
    while i < len(data):
        for size in (1, 2, 3, 4):
            try:
                out.append((data[i : i + size].decode("utf-8"), i, i + size))
                break
            except UnicodeDecodeError:
                continue
        else:
            out.append((f"<0x{data[i]:02X}>", i, i + 1))
            size = 1
        i += size
    return out


def merged_characters(tokens: Sequence[str]) -> list[str | None]:
    """For each token with byte pieces, the whole characters its bytes are part of.

    tokens: display texts (`token_text`). A run is a stretch of consecutive tokens holding
    `<0xNN>` pieces; its bytes, joined, decode to whole characters, and each token gets those
    its bytes overlap: E4 B8 | AD E6 | 96 87 gives "中", "中文", "文". Tokens without byte pieces
    get None. (A prompt that literally contains "<0xE4>" is read as that byte.)
    """
    out: list[str | None] = [None] * len(tokens)
    run: list[int] = []
    parts = [_as_bytes(t) for t in tokens]

    def close() -> None:
        if not run:
            return
        chars = _characters(b"".join(parts[i][0] for i in run))
        start = 0
        for i in run:
            end = start + len(parts[i][0])
            out[i] = "".join(c for c, a, b in chars if a < end and b > start)
            start = end
        run.clear()

    for i, (_data, had) in enumerate(parts):
        if had:
            run.append(i)
        else:
            close()
    close()
    return out
