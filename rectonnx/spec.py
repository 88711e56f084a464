"""``ExplanationSpec``: what an explanation is, validated once and carried by every surface.

    spec = ExplanationSpec("rectgrad", q=95)          # the paper's padding trick by default
    spec = ExplanationSpec("smoothgrad", samples=20, sigma=0.1)
    rectonnx.rewrite("model.onnx", spec)              # or rewrite("model.onnx", "rectgrad", q=95)

A spec is a method and the value of every option that method takes (options declared once, in
methods.py); options the caller does not set take the method's defaults. It is frozen, hashable
and serialisable (``to_dict`` / ``from_dict``, JSON): the explainer graph stores it in its
``metadata_props`` (artifact.py), batch runs in ``run.json``, and the CLI builds it from flags
generated from the same declarations. Every invalid value (wrong type, out of range, NaN, an
option the method does not take, a contradiction such as q with tau) raises
``options.OptionError`` (a ValueError) naming the option and what is allowed.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from .methods import (METHOD_NAMES, MethodEntry, all_options, build, check_common, entry,
                      methods_taking)
from .options import OptionError, plain


class ExplanationSpec:
    """A method and its validated settings (see the module docstring)."""

    __slots__ = ("_method", "_settings", "_given")

    def __init__(self, method: str = "rectgrad", **options):
        chosen = entry(method)
        taken = {o.name: o for o in chosen.all_options()}
        unknown = sorted(set(options) - set(taken))
        if unknown:
            declared = all_options()
            details = []
            for name in unknown:
                if name in declared:
                    details.append(f"{name} (an option of {', '.join(methods_taking(name))})")
                else:
                    details.append(name)
            raise OptionError(f"{method} has no option {', '.join(details)}; its options: "
                              f"{', '.join(taken)}")
        settings = {}
        for name, option in taken.items():
            settings[name] = option.check(options[name]) if name in options \
                else option.check(chosen.default(option))
        if chosen.check is not None:
            chosen.check(settings, set(options))
        check_common(settings, set(options))
        if method == "rectgrad" and settings["tau"] is not None:
            settings["q"] = None  # a constant threshold: no percentile
        object.__setattr__(self, "_method", method)
        object.__setattr__(self, "_settings", settings)
        object.__setattr__(self, "_given", frozenset(options))

    # -- reading ----------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        return self._method

    @property
    def given(self) -> frozenset:
        """The options the caller set (the rest are the method's defaults)."""
        return self._given

    @property
    def entry(self) -> MethodEntry:
        return entry(self._method)

    def settings(self) -> dict[str, Any]:
        """Every option of the method with its value (a copy)."""
        return dict(self._settings)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        settings = object.__getattribute__(self, "_settings")
        if name in settings:
            return settings[name]
        if name in all_options():
            return None  # an option of another method: not used by this one
        raise AttributeError(f"ExplanationSpec has no option {name!r}")

    def __setattr__(self, name, value):
        raise AttributeError("ExplanationSpec is frozen; use spec.replace(...)")

    def __eq__(self, other) -> bool:
        return isinstance(other, ExplanationSpec) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        if not hasattr(self, "_settings"):  # failed in __init__
            return "ExplanationSpec(<invalid>)"
        args = ", ".join(f"{k}={v!r}" for k, v in self._settings.items())
        return f"ExplanationSpec({self._method!r}, {args})"

    def describe(self) -> str:
        """One line for people: the method and the options that differ from no-op values."""
        shown = {k: v for k, v in self._settings.items()
                 if v not in (None, False) and not (k == "threshold" and v == "topk")
                 and not (k == "recall" and self._settings.get("threshold") != "approx")
                 and not (k == "runtime" and v == "any")
                 and not (k == "token_reduction" and v == "auto")
                 and not (k == "precision" and v == "model")}
        return self._method + (" (" + ", ".join(f"{k}={_short(v)}" for k, v in shown.items())
                               + ")" if shown else "")

    # -- changing and serialising -----------------------------------------------------------------
    def replace(self, **changes) -> "ExplanationSpec":
        """A new spec with ``changes`` (``method=`` switches the method; options the new method
        does not take are dropped unless given in ``changes``)."""
        method = changes.pop("method", self._method)
        given = {k: self._settings[k] for k in self._given}
        if method != self._method:
            taken = {o.name for o in entry(method).all_options()}
            given = {k: v for k, v in given.items() if k in taken}
        if "tau" in changes and changes["tau"] is not None:
            given.pop("q", None)
        if "q" in changes and changes["q"] is not None:
            given.pop("tau", None)
        given.update(changes)
        return ExplanationSpec(method, **given)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self._method, **{k: plain(v) for k, v in self._settings.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExplanationSpec":
        """The spec of ``to_dict`` output (None values mean the default)."""
        if not isinstance(data, Mapping) or "method" not in data:
            raise OptionError(f"not an explanation spec: {data!r}")
        chosen = entry(data["method"])
        defaults = {o.name: plain(o.check(chosen.default(o))) for o in chosen.all_options()}
        # values equal to the defaults are not "given" (checks between given options hold)
        options = {k: v for k, v in data.items() if k != "method" and v is not None
                   and not (k in defaults and defaults[k] == v)}
        return cls(data["method"], **options)

    @classmethod
    def from_json(cls, text: str) -> "ExplanationSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OptionError(f"not an explanation spec (invalid JSON: {exc})") from None
        return cls.from_dict(data)

    def conflicts(self, method: str | None, options: Mapping[str, Any]) -> list[str]:
        """How ``method`` and ``options`` (as a caller would pass them) contradict this spec:
        ``"option: asked X, is Y"`` lines; empty when they agree (unset ones always do)."""
        found = []
        if method is not None and method != self._method:
            found.append(f"method: asked {method}, is {self._method}")
            return found
        asked = self.replace(**options) if options else self  # in this spec's context
        for name in options:
            if asked._settings.get(name) != self._settings.get(name):
                found.append(f"{name}: asked {_short(asked._settings.get(name))}, is "
                             f"{_short(self._settings.get(name))}")
        return found


def _short(value) -> str:
    if isinstance(value, tuple):
        return f"array{_shape(value)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _shape(value) -> list[int]:
    shape = []
    while isinstance(value, tuple):
        shape.append(len(value))
        value = value[0] if value else None
    return shape


def resolve(method: "str | ExplanationSpec | None" = None, **options) -> ExplanationSpec:
    """The spec of a surface's arguments: a spec (``options`` then change it), or a method name
    (default rectgrad) with its options."""
    if isinstance(method, ExplanationSpec):
        return method.replace(**options) if options else method
    return ExplanationSpec(method or "rectgrad", **options)


def get_method(name: str, **options):
    """The built ``gates.Method`` of ``name`` with ``options`` (validated as a spec)."""
    return build(ExplanationSpec(name, **options))


__all__ = ["ExplanationSpec", "OptionError", "METHOD_NAMES", "resolve", "get_method"]
