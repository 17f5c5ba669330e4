"""A small declarative type language for the JSON read from a checkpoint, and its one parser.

A checkpoint's metadata is untrusted input: a flipped bit, a hand edit or a hostile file must
become one :class:`CheckpointError` that names the file and the field, never a KeyError deep
inside a reader and never a silent run on a value of the wrong kind. So every metadata file is
described once, as a tree of specs (``Obj``, ``Int``, ``ListOf`` ...), and :func:`parse`
checks a value against it: types (a bool is never an int), bounds, lengths, and no unknown keys.

Error text stays short: a value is shown as its type and at most 40 characters of its repr.
A spec raises :class:`Invalid` with the path *below itself*; each container adds its own key
while the error unwinds, so the common case (a valid file of a million ranges) builds no paths.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

from fft_dist.errors import CheckpointError

MAX_COUNT = 2**53 - 1
"""The largest integer a count may hold: every JSON reader, not only Python's, reads it exactly."""

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _repr(value: Any, limit: int) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def short(value: Any, limit: int = 40) -> str:
    """`value` as its type and a repr cut at `limit` characters (never dump a large value)."""
    return "null" if value is None else f"{type(value).__name__} {_repr(value, limit)}"


class Invalid(Exception):
    """A mismatch at `path` (keys and indices, relative to the spec that raised it, growing as it
    unwinds); :func:`parse` turns it into a CheckpointError."""

    def __init__(self, path: tuple, message: str):
        super().__init__(message)
        self.path, self.message = path, message

    def under(self, key) -> Invalid:
        self.path = (key, *self.path)
        return self


def mismatch(expected: str, value: Any, hint: str = "", path: tuple = ()) -> Invalid:
    return Invalid(path, f"expected {expected}, got {short(value)}{'; ' + hint if hint else ''}")


class _Key(str):
    """A map key in a path: always shown as ['key'] (tensor names hold dots)."""


def dotted(path: tuple) -> str:
    """('tensors', 'model.a', 'kinds', 'param', 'ranges', 0) -> tensors['model.a'].kinds.param.ranges[0]."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, _Key) or not _IDENT.match(part):
            out += f"[{_repr(str(part), 60)}]"
        else:
            out += f".{part}" if out else part
    return out


class Spec:
    expected = "a value"

    def check(self, value: Any) -> None:
        """Raise :class:`Invalid` unless `value` matches."""
        raise NotImplementedError


def parse(spec: Spec, value: Any, where: str, *, at: tuple = ()) -> Any:
    """`value` itself once it matches `spec`; else a CheckpointError
    ``"<where>: field <dotted.path>: expected ..., got ..."``. `at`: the path of `value` in its file."""
    try:
        spec.check(value)
    except Invalid as e:
        field = dotted((*at, *e.path))
        raise CheckpointError(f"{where}: {f'field {field}: ' if field else ''}{e.message}") from None
    except RecursionError:
        raise CheckpointError(f"{where}: nested too deeply") from None
    return value


class Int(Spec):
    """An integer (never a bool, never a float such as 1.0 or 1e30) in [min, max]."""

    def __init__(self, min: int = 0, max: int = MAX_COUNT, *, expected: str | None = None):
        self.min, self.max = min, max
        self.expected = expected or (f"an integer >= {min} and < 2**53" if max == MAX_COUNT
                                     else f"an integer from {min} to {max}")

    def check(self, value):
        if type(value) is not int or not self.min <= value <= self.max:  # JSON gives exact ints; bool is not one
            raise mismatch(self.expected, value)


class Float(Spec):
    """A number (an integer is one too); NaN and +-Infinity only when not `finite`."""

    def __init__(self, finite: bool = True):
        self.finite = finite
        self.expected = "a finite number" if finite else "a number (NaN and Infinity allowed)"

    def check(self, value):
        if type(value) is float:
            if self.finite and not math.isfinite(value):
                raise mismatch(self.expected, value)
        elif type(value) is not int or abs(value) > 1.7e308:  # an int no float holds
            raise mismatch(self.expected, value)


class Str(Spec):
    """A string of `min_len` to `max_len` characters, matching `pattern` (a full match) if given."""

    def __init__(self, pattern: str | None = None, *, min_len: int = 0, max_len: int = 4096,
                 expected: str | None = None):
        self.pattern = re.compile(pattern) if pattern else None
        self.min_len, self.max_len = min_len, max_len
        self.expected = expected or (f"a string matching {pattern}" if pattern else
                                     "a non-empty string" if min_len else "a string")
        if not pattern and not expected and max_len < 4096:
            self.expected += f" of at most {max_len} characters"

    def check(self, value):
        if (type(value) is not str or not self.min_len <= len(value) <= self.max_len
                or (self.pattern is not None and not self.pattern.fullmatch(value))):
            raise mismatch(self.expected, value)


class Const(Spec):
    def __init__(self, value: Any):
        self.value, self.expected = value, repr(value)

    def check(self, value):
        if type(value) is not type(self.value) or value != self.value:
            raise mismatch(self.expected, value)


class Bool(Spec):
    expected = "true or false"

    def check(self, value):
        if type(value) is not bool:
            raise mismatch(self.expected, value)


class AnyJSON(Spec):
    """Whatever JSON holds: for opaque values another layer checks (a model config, a trainer dict)."""

    expected = "any JSON value"

    def check(self, value):
        return None


class Nullable(Spec):
    def __init__(self, spec: Spec):
        self.spec, self.expected = spec, f"{spec.expected} or null"

    def check(self, value):
        if value is None:
            return
        try:
            self.spec.check(value)
        except Invalid as e:
            if not e.path:  # the value itself is wrong: say that null was fine too
                raise mismatch(self.expected, value) from None
            raise


class ListOf(Spec):
    """A list of `item`s, `min_len` to `max_len` long (the length is checked before any item)."""

    def __init__(self, item: Spec, *, min_len: int = 0, max_len: int = MAX_COUNT):
        self.item, self.min_len, self.max_len = item, min_len, max_len
        size = (f"{min_len}" if min_len == max_len else f"{min_len} to {max_len}" if max_len < MAX_COUNT
                else f"at least {min_len}")
        self.expected = f"a list of {size} items"

    def check(self, value):
        if type(value) is not list:
            raise mismatch(self.expected, value)
        if not self.min_len <= len(value) <= self.max_len:
            raise Invalid((), f"expected {self.expected}, got a list of {len(value)}")
        i, check = 0, self.item.check
        try:
            for i, v in enumerate(value):
                check(v)
        except Invalid as e:
            raise e.under(i) from None


class Tuple(Spec):
    """A fixed-length list whose items have their own specs, e.g. a range [start, stop, file, key]."""

    def __init__(self, *items: Spec, expected: str):
        self.items, self.expected = items, expected

    def check(self, value):
        if type(value) is not list or len(value) != len(self.items):
            raise mismatch(self.expected, value)
        i = 0
        try:
            for i, (spec, v) in enumerate(zip(self.items, value)):
                spec.check(v)
        except Invalid as e:
            raise e.under(i) from None


class MapOf(Spec):
    """A JSON object with free keys (checked by `key`) whose values all follow `value`."""

    def __init__(self, value: Spec, *, key: Spec | None = None, min_len: int = 0, expected: str | None = None):
        self.value, self.key, self.min_len = value, key or Str(min_len=1, max_len=1024), min_len
        self.expected = expected or ("an object" if not min_len else f"an object with at least {min_len} entry")

    def check(self, value):
        if type(value) is not dict:
            raise mismatch(self.expected, value)
        if len(value) < self.min_len:
            raise Invalid((), f"expected {self.expected}, got an empty object")
        k = None
        try:
            for k, v in value.items():
                self.key.check(k)
                self.value.check(v)
        except Invalid as e:
            raise e.under(_Key(k)) from None


JSON_OBJECT = MapOf(AnyJSON(), key=Str(max_len=1024))
"""An object whose inside another layer checks (a Hugging Face config, the trainer's own dict)."""


class Obj(Spec):
    """A JSON object with exactly these keys: every `required` one, any `optional` one, nothing else.

    `before(value)` may raise :class:`Invalid` (its path relative to this object) once the keys
    are right and before any value is checked: a cheap cross-field check that spares checking
    10,000 entries first. `after(value)` runs once every value is checked.
    """

    def __init__(self, required: Mapping[str, Spec], optional: Mapping[str, Spec] | None = None, *,
                 expected: str = "an object", before: Callable[[dict], None] | None = None,
                 after: Callable[[dict], None] | None = None):
        self.required, self.optional = dict(required), dict(optional or {})
        self.specs = {**self.required, **self.optional}
        self.expected, self.before, self.after = expected, before, after

    def _fields(self) -> str:
        return ", ".join(map(repr, self.specs)) if len(self.specs) <= 16 else f"{len(self.specs)} known fields"

    def check(self, value):
        if type(value) is not dict:
            raise mismatch(self.expected, value)
        for key in self.required:
            if key not in value:
                raise Invalid((key,), f"missing (this object's fields: {self._fields()})")
        for key in value:
            if key not in self.specs:
                raise Invalid((str(key),), f"unknown field (this object's fields: {self._fields()})")
        if self.before is not None:
            self.before(value)
        key = None
        try:
            for key, v in value.items():
                self.specs[key].check(v)
        except Invalid as e:
            raise e.under(key) from None
        if self.after is not None:
            self.after(value)


class Forms(Spec):
    """One of several object forms (e.g. the two sampler positions): the value is checked against the
    form whose fields it has most of, so the error names the field that is wrong in that form."""

    def __init__(self, *forms: Obj, expected: str):
        self.forms, self.expected = forms, expected

    def check(self, value):
        if type(value) is not dict:
            raise mismatch(self.expected, value)

        def fit(form: Obj) -> int:
            return sum(1 if k in form.specs else -1 for k in value)

        max(self.forms, key=fit).check(value)


class Check(Spec):
    """`spec`, then `problem(value)`: None when fine, else a reason (shown after "expected <expected>")."""

    def __init__(self, spec: Spec, problem: Callable[[Any], str | None], *, expected: str | None = None):
        self.spec, self.problem = spec, problem
        self.expected = expected or spec.expected

    def check(self, value):
        self.spec.check(value)
        reason = self.problem(value)
        if reason:
            raise mismatch(self.expected, value, reason)
