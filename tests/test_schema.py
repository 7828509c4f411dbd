"""The field annotations the config loader and the CLI read: Literal choices, Range bounds, field docstrings."""
import argparse
from dataclasses import dataclass

import pytest

from danlu.registry import ConfigError
from danlu.schema import Annotated, Literal, Range, base_type, check_value, choices, field_docs, flag_type


@pytest.mark.parametrize("bound, text, inside, outside", [
    (Range(ge=1), ">= 1", [1, 7], [0, -1]),
    (Range(gt=0), "> 0", [1e-9, 3.0], [0.0, -1.0]),
    (Range(ge=0, lt=1), "in [0, 1)", [0.0, 0.999], [1.0, -0.1]),
    (Range(gt=0, le=1), "in (0, 1]", [1.0, 0.5], [0.0, 1.5]),
    (Range(le=2.5), "<= 2.5", [2.5, -9], [2.6]),
])
def test_range_bounds_and_their_wording(bound, text, inside, outside):
    assert str(bound) == text
    assert all(bound.holds(x) for x in inside) and not any(bound.holds(x) for x in outside)


def test_check_value_names_key_value_and_what_is_allowed():
    tp = Literal["sgd", "momentum", "adam", "adamw"]
    assert check_value("adam", tp, "train.optimizer") == "adam"
    with pytest.raises(ConfigError, match=r"^train.optimizer: unknown value 'adamm' \(did you mean 'adam'\?\); "
                                          r"expected one of: sgd, momentum, adam, adamw$"):
        check_value("adamm", tp, "train.optimizer")
    with pytest.raises(ConfigError, match=r"^x: unknown value 'zzz'; expected one of: sgd"):  # nothing close
        check_value("zzz", tp, "x")
    with pytest.raises(ConfigError, match=r"^train.lr: expected a number > 0, got -1.0$"):
        check_value(-1.0, Annotated[float, Range(gt=0)], "train.lr")
    with pytest.raises(ConfigError, match=r"^train.epochs: expected an integer >= 1, got 0$"):
        check_value(0, Annotated[int, Range(ge=1)], "train.epochs")
    assert choices(Annotated[int, Range(ge=1)]) == () and base_type(tp) is str and base_type(Annotated[int, Range()]) is int


@dataclass(frozen=True)
class Example:
    size: Annotated[int, Range(ge=1)] = 3
    """How many,
    over two lines."""
    mode: Literal["fast", "slow"] = "fast"
    undocumented: float = 0.0


def test_field_docs_are_the_strings_under_the_fields():
    assert field_docs(Example) == {"size": "How many, over two lines."}


def test_flag_type_converts_and_checks_like_the_loader():
    size, mode = flag_type(Annotated[int, Range(ge=1)], "--size"), flag_type(Literal["fast", "slow"], "--mode")
    assert size("4") == 4 and mode("slow") == "slow"
    with pytest.raises(argparse.ArgumentTypeError, match=r"^expected an integer >= 1, got 0$"):
        size("0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^expected an integer, got 'four'$"):
        size("four")
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown value 'slo' \(did you mean 'slow'\?\)"):
        mode("slo")
