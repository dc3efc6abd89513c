"""The generated peer-comparison block of ``docs/benchmarks.md``: find it, replace it, carry it over.

``make bench-peers`` owns the text between :data:`BEGIN` and :data:`END` (markers included); ``make bench`` rewrites
the rest of the file and keeps that block (:func:`preserve_block`).
"""

from __future__ import annotations

BEGIN = "<!-- peers:begin -->"
END = "<!-- peers:end -->"


def extract_block(text: str) -> str | None:
    """The block, markers included, or ``None`` when ``text`` has no complete block."""
    start = text.find(BEGIN)
    if start < 0:
        return None
    stop = text.find(END, start + len(BEGIN))
    if stop < 0:
        return None
    return text[start : stop + len(END)]


def replace_block(text: str, block: str) -> str:
    """``text`` with its block replaced by ``block`` (which must carry the markers), or appended when absent."""
    if not (block.startswith(BEGIN) and block.rstrip().endswith(END)):
        raise ValueError(f"The block must start with {BEGIN!r} and end with {END!r}.")
    block = block.rstrip()
    old = extract_block(text)
    if old is not None:
        return text.replace(old, block, 1)
    if not text.strip():
        return block + "\n"
    return text.rstrip("\n") + "\n\n" + block + "\n"


def preserve_block(new_text: str, old_text: str | None) -> str:
    """``new_text`` carrying over the block of ``old_text`` (if any): ``make bench`` calls this before writing."""
    block = extract_block(old_text or "")
    if block is None or extract_block(new_text) is not None:
        return new_text
    return replace_block(new_text, block)
