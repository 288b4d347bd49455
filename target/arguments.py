"""Checks a control request's arguments against the service method's
signature and type hints before the method runs, so a wrong JSON type is a
one-line refusal ("volume.create: name must be a string") instead of an
exception deep inside the method.

Supported hints are what JSON can carry: Any, str, int, float, bool, None,
unions of those, list[X] and dict[str, X]. A method whose hint is anything
else fails loudly when the table is built (tests build it for every op).
Parameters named in INTERNAL are supplied by the daemon, never the client.
"""
from __future__ import annotations

import inspect
import types
import typing
from typing import Any, Callable

from .errors import clip

#: Keyword parameters the daemon fills in itself (e.g. the requesting peer).
INTERNAL = frozenset({"peer"})
#: Longest string any argument may be (PATH_MAX); bounds echoed values too.
MAX_TEXT = 4096


class ArgumentError(ValueError):
    """The request's arguments do not fit the operation; one line for the client."""


_NAMES = {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
          type(None): "null", list: "a list", dict: "an object"}


def describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is Any:
        return "any value"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return "a list" if item is Any else f"a list of {_plural(describe(item))}"
    if origin is dict:
        _, value = typing.get_args(hint) or (str, Any)
        return "an object" if value is Any else f"an object of {_plural(describe(value))}"
    if hint in _NAMES:
        return _NAMES[hint]
    raise TypeError(f"unsupported type hint {hint!r} on a control operation")


def _plural(text: str) -> str:
    return text.removeprefix("a ").removeprefix("an ") + "s" if " or " not in text else text


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint) or (str, Any)
        return isinstance(value, dict) and all(_fits(v, item) for v in value.values())
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:            # JSON true/false are not numbers here
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    raise TypeError(f"unsupported type hint {hint!r} on a control operation")


def _bad_text(value: Any) -> str | None:
    """Strings anywhere in an argument: bounded, no NUL (the OS and SQLite
    stop or fail at one), no lone surrogates (they cannot be encoded)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if len(v) > MAX_TEXT:
                return f"is longer than {MAX_TEXT} characters"
            if "\x00" in v:
                return "contains a NUL character"
            try:
                v.encode()
            except UnicodeEncodeError:
                return "is not valid Unicode text"
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
    return None


class Signature:
    """What one operation accepts, read once from its method."""

    def __init__(self, op: str, fn: Callable[..., Any]) -> None:
        self.op = op
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
        self.params: dict[str, Any] = {}
        self.required: list[str] = []
        self.var_keyword: Any = None      # hint of **kwargs, or None when there are none
        self.wants_peer = "peer" in sig.parameters
        for name, p in sig.parameters.items():
            if name in INTERNAL or name == "self":
                continue
            hint = hints.get(name, Any)
            describe(hint)                 # refuse unsupported hints now, not per request
            if p.kind is p.VAR_KEYWORD:
                self.var_keyword = hint
            elif p.kind is p.VAR_POSITIONAL:
                raise TypeError(f"{op}: *args cannot come from a JSON request")
            else:
                self.params[name] = hint
                if p.default is p.empty:
                    self.required.append(name)

    def check(self, args: dict[str, Any]) -> None:
        for name, value in args.items():
            hint = self.params.get(name, self.var_keyword)
            if hint is None or name in INTERNAL:
                known = ", ".join(self.params) or "none"
                raise ArgumentError(f"{self.op}: unknown argument {clip(name, 40)} "
                                    f"(known: {known})")
            if not _fits(value, hint):
                raise ArgumentError(f"{self.op}: {name} must be {describe(hint)}, "
                                    f"not {clip(value)}")
            why = _bad_text(value)
            if why:
                raise ArgumentError(f"{self.op}: {name} {why}")
        missing = [n for n in self.required if n not in args]
        if missing:
            raise ArgumentError(f"{self.op}: missing argument {', '.join(missing)}")
