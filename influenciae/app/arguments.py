"""Argument types of the console commands: each parses one command-line string or raises
``argparse.ArgumentTypeError`` with a one-line message (argparse then exits with code 2).

The ``influenciae`` subcommands (:mod:`influenciae.cli`) and ``influenciae score`` share them. The module itself
imports the standard library only (and nothing of the console script), so any command module can import it without
an import cycle.
"""

from __future__ import annotations

import argparse
import ast
import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "finite_float",
    "fraction",
    "input_shape",
    "integer_at_least",
    "key_value",
    "layer_reference",
    "non_negative_float",
    "positive_float",
]


def _checked_float(text: str, malformed: str, out_of_range: str, accept: Callable[[float], bool]) -> float:
    """``float(text)``; ``"expected {malformed}"`` for text that is not a number, ``"expected {out_of_range}"`` for
    a number ``accept`` refuses."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {malformed}, got {text!r}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"expected {out_of_range}, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    return _checked_float(text, "a number in (0, 1)", "a number in (0, 1)", lambda value: 0.0 < value < 1.0)


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _checked_float(
        text, "a non-negative number", "a finite non-negative number", lambda value: 0.0 <= value < math.inf
    )


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _checked_float(text, "a positive number", "a finite positive number", lambda value: 0.0 < value < math.inf)


def finite_float(text: str) -> float:
    """A finite number (not nan or ±inf)."""
    return _checked_float(text, "a number", "a finite number", math.isfinite)


def integer_at_least(minimum: int) -> Callable[[str], int]:
    """The type of an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in some messages
    return parse


def layer_reference(text: str) -> int | str:
    """A layer index (``-1`` = last) or a layer name."""
    try:
        return int(text)
    except ValueError:
        if not text:
            raise argparse.ArgumentTypeError("expected a layer index or name, got an empty string") from None
        return text


def input_shape(text: str) -> tuple[int, ...]:
    """The shape of one input, ``8,8,1`` or ``8x8x1``: positive dimensions."""
    try:
        dims = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape such as 8,8,1, got {text!r}") from None
    if not dims or any(dim <= 0 for dim in dims):
        raise argparse.ArgumentTypeError(f"expected positive dimensions such as 8,8,1, got {text!r}")
    return dims


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``: the key an identifier, the value a Python literal (``1e-6``, ``200``, ``True``) or a string."""
    key, separator, raw = text.partition("=")
    if not separator or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as tolerance=1e-6, got {text!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return key.strip(), value
