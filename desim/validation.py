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
  with the field named (``costs.vm_exit: must be a finite number``).

:func:`format_validation_error` turns the first error into one line that names
the field, says what was wrong and shows the value given.
"""
from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, ValidationError

INPUT_MODEL_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

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


def format_validation_error(err: ValidationError, where: str) -> str:
    """``where: field.path: message`` for the first error (and a count of the others)."""
    errs = err.errors()
    first = errs[0]
    loc = ".".join(str(x) for x in first["loc"]) or "(top level)"
    msg = first["msg"]
    kind = first["type"]
    if kind == "extra_forbidden":
        msg = "unknown field (remove it or check its spelling)"
    elif kind == "missing":
        msg = "required field is missing"
    elif kind in _TYPE_HINTS:
        msg = f"{_TYPE_HINTS[kind]}, got {_shown(first.get('input'))}"
    elif kind.startswith(("greater_than", "less_than", "too_short", "too_long", "literal_error")):
        msg = f"{msg}, got {_shown(first.get('input'))}"
    msg = msg.removeprefix("Value error, ").replace("\n", " ")
    more = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
    return f"{where}: {loc}: {msg}{more}"
