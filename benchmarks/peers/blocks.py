"""The generated peer-comparison blocks of ``docs/benchmarks.md``: find them, replace them, carry them over.

``make bench-peers`` owns the text between :data:`BEGIN` and :data:`END` (markers included), ``make bench-analysis``
the text between :data:`ANALYSIS_BEGIN` and :data:`ANALYSIS_END`; ``make bench`` rewrites the rest of the file and
keeps both blocks (:func:`preserve_block`).
"""

from __future__ import annotations

BEGIN = "<!-- peers:begin -->"
END = "<!-- peers:end -->"
ANALYSIS_BEGIN = "<!-- peers-analysis:begin -->"
ANALYSIS_END = "<!-- peers-analysis:end -->"


def extract_block(text: str, begin: str = BEGIN, end: str = END) -> str | None:
    """The block between ``begin`` and ``end``, markers included, or ``None`` when ``text`` has no complete block."""
    start = text.find(begin)
    if start < 0:
        return None
    stop = text.find(end, start + len(begin))
    if stop < 0:
        return None
    return text[start : stop + len(end)]


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
    """``new_text`` carrying over the blocks of ``old_text`` (if any): ``make bench`` calls this before writing."""
    for begin, end in ((BEGIN, END), (ANALYSIS_BEGIN, ANALYSIS_END)):
        block = extract_block(old_text or "", begin, end)
        if block is None or extract_block(new_text, begin, end) is not None:
            continue
        new_text = new_text.rstrip("\n") + "\n\n" + block + "\n" if new_text.strip() else block + "\n"
    return new_text
