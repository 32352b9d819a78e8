"""Typed, range-checked arguments as data: the one place a hyperparameter's rule lives.

An :class:`Arg` says what one argument is (its type, default, range, choices, help). The
same object checks a value given to Python code (:meth:`Arg.check`), and writes the JSON
Schema fragment that validates a workflow config (:meth:`Arg.schema`), so a range is
written once, beside the thing it describes. Torch-free: the Snakemake dry run validates a
whole grid with these without importing PyTorch.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["number", "integer", "boolean", "string", "numbers", "any"]

# YAML 1.1 (PyYAML, Snakemake's config reader) reads `1e-3` and `5E-4` as text; a number
# written that way is still a number (YAML 1.2 and JSON agree).
FLOAT_PATTERN = r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$"
_FLOAT = re.compile(FLOAT_PATTERN)


class ArgError(ValueError):
    """A value an :class:`Arg` refuses: ``key`` names the argument, ``why`` says what is
    wrong; the message is ``"key: why"``."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key, self.why = key, why


def as_number(value: Any) -> Any:
    """``value`` as a float if it is a number written as text (``"1e-3"``), else itself."""
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    return value


def is_number(value: Any) -> bool:
    """A real number (Python's or NumPy's), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Arg:
    """One argument: ``kind``, ``default``, and the values it accepts.

    ``minimum``/``maximum`` bound numbers (inclusive unless ``exclusive_minimum`` /
    ``exclusive_maximum``); ``choices`` lists the accepted values of a string; ``length``
    is the length of a ``numbers`` list (Adam's betas); a ``nullable`` argument also takes
    None (YAML's ``null``: "off"). Numbers must be finite.
    """

    name: str
    kind: Kind
    default: Any = None
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: tuple[Any, ...] | None = None
    length: int | None = None
    pattern: str | None = None
    nullable: bool = False

    # --- checking -----------------------------------------------------------------------

    def _range_text(self) -> str:
        def show(bound: float) -> str:
            return str(int(bound)) if self.kind == "integer" else f"{bound:g}"

        parts = []
        if self.minimum is not None:
            parts.append(f"{'>' if self.exclusive_minimum else '>='} {show(self.minimum)}")
        if self.maximum is not None:
            parts.append(f"{'<' if self.exclusive_maximum else '<='} {show(self.maximum)}")
        return " and ".join(parts)

    def describe(self) -> str:
        """What the argument accepts, in words (for messages and the README)."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        text = {
            "number": "a number",
            "integer": "an integer",
            "boolean": "true or false",
            "string": "a string",
            "numbers": f"a list of {self.length or 'some'} numbers",
            "any": "any value",
        }[self.kind]
        bound = self._range_text()
        text = f"{text} {bound}" if bound else text
        return f"{text}, or null" if self.nullable else text

    def _fail(self, value: Any) -> ArgError:
        return ArgError(self.name, f"must be {self.describe()}, got {value!r}")

    def _check_number(self, value: Any, integer: bool) -> Any:
        value = value if integer else as_number(value)
        if not is_number(value) or (integer and not isinstance(value, int)):
            raise self._fail(value)
        if not math.isfinite(value):
            raise self._fail(value)
        low, high = self.minimum, self.maximum
        if low is not None and (value <= low if self.exclusive_minimum else value < low):
            raise self._fail(value)
        if high is not None and (value >= high if self.exclusive_maximum else value > high):
            raise self._fail(value)
        return value if integer else float(value)

    def check(self, value: Any) -> Any:
        """``value`` normalised (numbers as float, lists of numbers as tuples), or raise an
        :class:`ArgError` that names the argument."""
        if value is None and self.nullable:
            return None
        if self.choices is not None:
            if value not in self.choices or isinstance(value, bool) != isinstance(
                self.choices[0], bool
            ):
                raise self._fail(value)
            return value
        if self.kind == "number":
            return self._check_number(value, integer=False)
        if self.kind == "integer":
            return self._check_number(value, integer=True)
        if self.kind == "boolean":
            if not isinstance(value, bool):
                raise self._fail(value)
            return value
        if self.kind == "string":
            if not isinstance(value, str) or (
                self.pattern is not None and not re.fullmatch(self.pattern, value)
            ):
                raise self._fail(value)
            return value
        if self.kind == "numbers":
            if not isinstance(value, (list, tuple)) or (
                self.length is not None and len(value) != self.length
            ):
                raise self._fail(value)
            items = [as_number(v) for v in value]
            if not all(is_number(v) and math.isfinite(v) for v in items):
                raise self._fail(value)
            return tuple(float(v) for v in items)
        return value

    # --- JSON Schema ----------------------------------------------------------------------

    def schema(self) -> dict[str, Any]:
        """The JSON Schema (2020-12) fragment that accepts what :meth:`check` accepts."""
        out: dict[str, Any] = {}
        if self.help:
            out["description"] = self.help
        if self.choices is not None:
            return {**out, "enum": list(self.choices)}
        if self.kind in ("number", "integer"):
            out["type"] = self.kind
            if self.minimum is not None:
                out["exclusiveMinimum" if self.exclusive_minimum else "minimum"] = self.minimum
            if self.maximum is not None:
                out["exclusiveMaximum" if self.exclusive_maximum else "maximum"] = self.maximum
        elif self.kind == "numbers":
            out |= {"type": "array", "items": {"type": "number"}}
            if self.length is not None:
                out |= {"minItems": self.length, "maxItems": self.length}
        elif self.kind in ("boolean", "string"):
            out["type"] = self.kind
            if self.pattern is not None:
                out["pattern"] = self.pattern
        if self.nullable:
            described = {"description": out.pop("description")} if "description" in out else {}
            return {**described, "anyOf": [out, {"type": "null"}]}
        return out


def check_args(args: Iterable[Arg], values: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """Check ``values`` against ``args`` by name; return them normalised.

    Raises an :class:`ArgError` naming the first unknown or invalid argument (``owner`` is
    what takes them, for the message: ``"zsharp"``, ``"model 'vit'"``).
    """
    by_name = {a.name: a for a in args}
    out = {}
    for key, value in values.items():
        if key not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            raise ArgError(key, f"not an argument of {owner} (it takes: {known})")
        out[key] = by_name[key].check(value)
    return out


def schema_of(args: Iterable[Arg]) -> dict[str, Any]:
    """A closed JSON Schema object whose properties are ``args``."""
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {a.name: a.schema() for a in args},
    }
