"""What a config field accepts, written on its type: `Literal[...]` for a choice, `Range` for bounds.

    optimizer: Literal["sgd", "momentum", "adam", "adamw"] = "adam"
    lr: Annotated[float, Range(gt=0)] = 1e-3

The config loader (`danlu.config.load`) converts every value to its field's type and checks it with
`check_value`, once, before anything is read or written; the CLI checks its flags the same way. The
dataclasses themselves stay plain: cross-field rules (e.g. embed_dim divisible by num_heads) live in
their `__post_init__`.

>>> check_value("adamm", Literal["sgd", "adam"], "train.optimizer")  # doctest: +SKIP
ConfigError: train.optimizer: unknown value 'adamm' (did you mean 'adam'?); expected one of: sgd, adam
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Annotated, Literal

from danlu.registry import ConfigError

__all__ = ["Annotated", "Fraction", "Literal", "NonNegative", "Positive", "Range", "base_type", "check_value",
           "choices", "field_docs", "flag_type"]


@dataclass(frozen=True)
class Range:
    """Bounds of a number (the names of pydantic's Field): ge >=, gt >, le <=, lt <."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, x) -> bool:
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def __str__(self):
        low = (f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None)
        high = (f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        if high:
            return ("<= " if high[-1] == "]" else "< ") + high[:-1]
        return "any value"


# the ranges most fields share
Positive = Annotated[int, Range(ge=1)]
"""A count that cannot be zero: epochs, batch size, layers, widths."""
NonNegative = Annotated[int, Range(ge=0)]
"""A count where 0 means "off" or "all": patience, warmup steps, limits."""
Fraction = Annotated[float, Range(ge=0, lt=1)]
"""A share below one: dropout rates, held-out fractions, momentum."""


def _num(x):
    return str(int(x)) if float(x).is_integer() else str(x)


def choices(tp) -> tuple:
    """The allowed values of a Literal type (also inside Annotated or Optional), else ()."""
    tp = _strip(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def check_value(value, tp, where):
    """Raise ConfigError unless `value` (already of the field's base type) is allowed by `tp`'s Literal
    choices and Range bounds; `where` names the key, e.g. train.lr. Returns the value."""
    allowed = choices(tp)
    if allowed and value not in allowed:
        hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        did = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{where}: unknown value {value!r}{did}; expected one of: "
                          + ", ".join(repr(a) if a == "" else str(a) for a in allowed))
    for bound in _ranges(tp):
        if value is not None and not bound.holds(value):
            kind = "an integer" if isinstance(value, int) else "a number"
            raise ConfigError(f"{where}: expected {kind} {bound}, got {value!r}")
    return value


def base_type(tp):
    """The plain type under Annotated (str for a Literal of strings)."""
    tp = _strip(tp)
    if typing.get_origin(tp) is Literal:
        return type(typing.get_args(tp)[0])
    return tp


def _strip(tp):
    if typing.get_origin(tp) is Annotated:
        return typing.get_args(tp)[0]
    return tp


def _ranges(tp):
    return [m for m in getattr(tp, "__metadata__", ()) if isinstance(m, Range)]


def flag_type(tp, name):
    """An argparse `type=` for a field: converts the text to the base type and checks choices and range,
    so that `--top-p 2` fails as `train.lr=-1` does in a config."""
    base = base_type(tp)
    if base is bool:
        raise TypeError(f"{name}: a bool field is a switch, not a typed flag")

    def convert(text):
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if base is int else 'a number'}, got {text!r}") from None
        try:
            return check_value(value, tp, name)
        except ConfigError as e:  # argparse names the flag itself
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None

    convert.__name__ = base.__name__  # argparse names the type in its messages
    return convert


def field_docs(cls) -> dict:
    """{field name: its docstring} — the string literal written under each field of a dataclass, which
    doubles as the help text of its CLI flag."""
    import ast
    import inspect
    import textwrap

    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs
