"""Declared options: each explanation setting is written once, here or in a method's registry
entry, with its type, range, default and help; validation, the CLI flags and the artifact's
metadata all read these declarations (spec.py builds the validated settings from them).

An ``Option`` validates one value (``Option.check``): the type (``bool`` is never a number;
integral floats are accepted for ints only when they are exact), the range, the allowed values,
and NaN or infinity are always refused. Every error names the option and what is allowed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = ("float", "int", "bool", "choice", "padding", "baseline", "text")
PADDING_TRICKS = ("exact", "border")  # False (off) is the third value


class OptionError(ValueError):
    """An option value that is not allowed (the message names the option and what is)."""


@dataclass(frozen=True)
class Option:
    """One setting: ``kind`` is float, int, bool, choice (one of ``choices``), padding (False,
    ``"exact"`` or ``"border"``), baseline (a finite number or array) or text (a non-empty
    string without control characters, e.g. a tensor name). ``low``/``high`` bound
    numbers (``open_low``: strictly above ``low``); ``nullable``: None is a valid value (it
    means "not used", e.g. no final threshold)."""

    name: str
    kind: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    choices: tuple = ()
    nullable: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise AssertionError(f"option {self.name}: unknown kind {self.kind!r}")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def allowed(self) -> str:
        """What values are allowed, in words."""
        if self.kind == "bool":
            text = "true or false"
        elif self.kind == "choice":
            text = "one of " + ", ".join(map(str, self.choices))
        elif self.kind == "padding":
            text = "False, True (= 'exact'), 'exact' or 'border'"
        elif self.kind == "baseline":
            text = "a finite number or array that broadcasts to one sample"
        elif self.kind == "text":
            text = "a non-empty name"
        else:
            noun = "an integer" if self.kind == "int" else "a finite number"
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.open_low else '>='} {self.low:g}")
            if self.high is not None:
                bounds.append(f"<= {self.high:g}")
            text = noun + (" " + " and ".join(bounds) if bounds else "")
        return text + (" (or None)" if self.nullable else "")

    def _fail(self, value) -> OptionError:
        shown = value if not isinstance(value, np.ndarray) else f"an array {list(value.shape)}"
        return OptionError(f"option {self.name} = {shown!r} is not allowed: expected "
                           f"{self.allowed()}")

    def check(self, value):
        """``value`` in canonical form (float, int, bool, str, False or a nested tuple), or
        OptionError."""
        if value is None:
            if self.nullable:
                return None
            raise self._fail(value)
        if self.kind == "bool":
            if isinstance(value, (bool, np.bool_)):
                return bool(value)
            raise self._fail(value)
        if self.kind == "choice":
            if isinstance(value, str) and value in self.choices:
                return value
            raise self._fail(value)
        if self.kind == "padding":
            if value is True or value == "exact":
                return "exact"
            if value is False or value == "off" or value == "none":
                return False
            if value == "border":
                return "border"
            raise self._fail(value)
        if self.kind == "baseline":
            return self._baseline(value)
        if self.kind == "text":
            if isinstance(value, str) and value.strip() and value.isprintable():
                return value
            raise self._fail(value)
        return self._number(value)

    def _number(self, value):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise self._fail(value)
        number = float(value)
        if not math.isfinite(number):
            raise self._fail(value)
        if self.kind == "int":
            if isinstance(value, numbers.Integral):
                number = int(value)
            elif number.is_integer() and abs(number) < 2 ** 53:
                number = int(number)
            else:
                raise self._fail(value)
        if self.low is not None and (number < self.low or (self.open_low and number == self.low)):
            raise self._fail(value)
        if self.high is not None and number > self.high:
            raise self._fail(value)
        return number

    def _baseline(self, value):
        if isinstance(value, (bool, np.bool_, str)):
            raise self._fail(value)
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise self._fail(value) from None
        if not np.isfinite(array).all():
            raise self._fail(value)
        if array.ndim == 0:
            return float(array)
        return _nested_tuple(array.tolist())


def _nested_tuple(value):
    return tuple(_nested_tuple(v) for v in value) if isinstance(value, list) else float(value)


def plain(value):
    """A canonical option value as JSON-friendly data (tuples become lists)."""
    return [plain(v) for v in value] if isinstance(value, tuple) else value
