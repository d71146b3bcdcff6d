"""One strict-type policy for every input model, and one line per validation error.

Every pydantic model that reads user input (scenario, profile, overrides)
uses :data:`INPUT_MODEL_CONFIG`:

* ``extra="forbid"`` — an unknown (misspelt) field is an error, not ignored;
* ``strict=True`` — no lax coercion: ``vcpus = true`` is not 1, ``prealloc =
  "yes"`` is not true, ``zap_control = "1"`` is not 1. Integers are accepted
  where a float is expected (``access_ns = 200``), nothing else is converted.
  Sizes and flags keep their documented spellings (``"64KiB"``,
  ``["readonly"]``) through their own parsers, which refuse booleans;
* ``allow_inf_nan=False`` — NaN and infinities are refused in every float field,
  with the field named (``costs.vm_exit: must be a finite number``);
* ``use_attribute_docstrings=True`` — a field's docstring is its description
  (``docs/scenario-reference.md`` is generated from them).

:func:`format_validation_error` turns the first error into one line that names
the field, says what was wrong and shows the value given.
"""
from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, ValidationError

INPUT_MODEL_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, use_attribute_docstrings=True)

_TYPE_HINTS = {
    "int_type": "must be an integer (write 8, not 8.0, true or \"8\")",
    "float_type": "must be a number (write 1.5 or 2, not true or \"1.5\")",
    "bool_type": "must be true or false (not 1 or \"yes\")",
    "string_type": "must be a string in quotes",
    "finite_number": "must be a finite number (NaN and infinities are refused)",
    "list_type": "must be a list [...]",
    "dict_type": "must be a table {...}",
    "model_type": "must be a table {...}",
}


def _shown(v: Any, limit: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[:limit] + "..."


def _is_union_tag(part: Any) -> bool:
    """A ``loc`` element naming a union member (``constrained-int``, ``literal['all','bsp']``), not a field."""
    return isinstance(part, str) and (part in ("int", "str", "float", "bool", "none", "list", "dict")
                                      or "[" in part or part.startswith(("constrained-", "function-")))


def _message(e: dict[str, Any]) -> str:
    kind, msg = e["type"], e["msg"]
    if kind == "extra_forbidden":
        return "unknown field (remove it or check its spelling)"
    if kind == "missing":
        return "required field is missing"
    if kind in _TYPE_HINTS:
        return f"{_TYPE_HINTS[kind]}, got {_shown(e.get('input'))}"
    msg = msg.removeprefix("Value error, ")
    if kind.startswith(("greater_than", "less_than", "too_short", "too_long", "literal_error")):
        msg = f"{msg}, got {_shown(e.get('input'))}"
    return msg


def format_validation_error(err: ValidationError, where: str) -> str:
    """``where: field.path: message`` for the first problem (and a count of the others).

    The alternatives of a union field (``vcpus``: a number or ``"all"``) are
    one problem: their messages are joined with "or".
    """
    groups: dict[str, list[str]] = {}
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not _is_union_tag(x)) or "(top level)"
        msg = _message(e)
        if msg not in groups.setdefault(loc, []):
            groups[loc].append(msg)
    loc, msgs = next(iter(groups.items()))
    n = len(groups) - 1
    more = f" (and {n} more problem{'s' if n > 1 else ''})" if n else ""
    return f"{where}: {loc}: {' or '.join(msgs)}{more}".replace("\n", " ")
