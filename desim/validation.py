"""Turn a pydantic ValidationError into one line that names the field and the fix."""
from __future__ import annotations

from pydantic import ValidationError


def format_validation_error(err: ValidationError, where: str) -> str:
    """``where: field.path: message`` for the first error (and a count of the others)."""
    errs = err.errors()
    first = errs[0]
    loc = ".".join(str(x) for x in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field (remove it or check its spelling)"
    elif first["type"] == "missing":
        msg = "required field is missing"
    msg = msg.removeprefix("Value error, ")
    more = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
    return f"{where}: {loc}: {msg}{more}"
