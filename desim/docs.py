"""The scenario reference, generated from the pydantic models: ``python -m desim.docs``.

Every field of a scenario file (:mod:`desim.scenario`) and of a host
profile's kernel section and costs (:mod:`desim.profile`) with its type,
default, unit and meaning. The meaning is the field's docstring (the string
under it in the model: ``use_attribute_docstrings``), the type, bounds and
default come from the model itself, and the unit from the field's name
(``*_us``, ``*_ns``, ``*_ms``) or its type (sizes are bytes). So adding a
field means writing its docstring and running::

    python -m desim.docs            # rewrites docs/scenario-reference.md
    python -m desim.docs --check    # exit 1 if the file is not current (tests/test_docs.py)

A field without a docstring is refused: the reference must explain every field.
"""
from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .profile import COST_NAMES, Kernel
from .scenario import (GuestSpec, MemslotOpSpec, MemslotSpec, PhaseSpec, ProfileOverrides, Scenario, TouchSpec,
                       TraceSpec, VmSpec, parse_flags, parse_size)

DEFAULT_PATH = Path("docs") / "scenario-reference.md"

# (TOML table, model, fields inherited from elsewhere that are listed there instead)
SECTIONS: list[tuple[str, type[BaseModel], str]] = [
    ("top level", Scenario, ""),
    ("[vm]", VmSpec, ""),
    ("[[vm.memslots]]", MemslotSpec, ""),
    ("[guest]", GuestSpec, ""),
    ("[[phases]]", PhaseSpec, "touch"),
    ("[[phases.touches]]", TouchSpec, ""),
    ("[[phases.memslot_ops]]", MemslotOpSpec, ""),
    ("[phases.memslot_trace]", TraceSpec, ""),
    ("[profile_overrides]", ProfileOverrides, ""),
]


def _metadata_validator(meta: list[Any]) -> str | None:
    for m in meta:
        func = getattr(m, "func", None)
        if func is parse_size:
            return "size"
        if func is parse_flags:
            return "flags"
    return None


def type_name(tp: Any) -> str:
    """A field's type as a reader of a TOML file sees it."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(tp)
        return _metadata_validator(meta) or type_name(base)
    if origin is typing.Literal:
        return " | ".join(f'`"{a}"`' if isinstance(a, str) else f"`{a}`" for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in args)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {type_name(inner)}"
    if origin is dict:
        return "table"
    if origin is tuple:
        return "array"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "table"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


def _bounds(f: FieldInfo) -> str:
    out = []
    for m in f.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >=")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {_num(v)}")
    return ", ".join(out)


def _num(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1 << 16 and (v & (v - 1)) == 0:
        return f"2^{v.bit_length() - 1}"
    if isinstance(v, float) and v.is_integer():
        return f"{int(v):,}"
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def _default(f: FieldInfo) -> str:
    if f.default_factory is not None:
        d = f.default_factory()
        empty = not d or (isinstance(d, BaseModel) and not any(d.model_dump().values()))
        return "empty" if empty else f"`{d}`"
    if f.default is PydanticUndefined:
        return "**required**"
    if f.default is None:
        return "none"
    if isinstance(f.default, bool):
        return f"`{str(f.default).lower()}`"
    if isinstance(f.default, str):
        return f'`"{f.default}"`'
    return f"`{_num(f.default)}`"


def unit_of(name: str, f: FieldInfo) -> str:
    """The unit of a field: from the name's suffix or (sizes) its type."""
    for suffix, unit in (("_us", "µs (simulated)"), ("_ns", "ns"), ("_ms", "ms (simulated)")):
        if name.endswith(suffix):
            return unit
    if _metadata_validator(f.metadata) == "size" or "size" in type_name(f.annotation).split(" or "):
        return 'bytes (`4096`, `"0x1000"`, `"64KiB"`, `"6GiB"`)'
    return ""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("``", "`").replace("|", "\\|")


def field_rows(model: type[BaseModel], skip: set[str] = frozenset()) -> list[str]:
    rows = ["| field | type | default | unit | meaning |", "|---|---|---|---|---|"]
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        if not f.description:
            raise ValueError(f"{model.__name__}.{name} has no docstring: write one under the field "
                             "(it is the field's entry in the scenario reference)")
        typ = _metadata_validator(f.metadata) or type_name(f.annotation)
        b = _bounds(f)
        rows.append(f"| `{name}` | {_cell(typ)}{' (' + b + ')' if b else ''} | {_default(f)} | "
                    f"{unit_of(name, f)} | {_cell(f.description)} |")
    return rows


def _doc(model: type[BaseModel]) -> str:
    doc = (model.__doc__ or "").strip()
    return _cell(doc.split("\n\n")[0]) if doc else ""


def render() -> str:
    """The whole reference as Markdown."""
    out = ["# Scenario reference", "",
           "<!-- Generated by `python -m desim.docs` from the pydantic models in desim/scenario.py and "
           "desim/profile.py. Do not edit: change a field's docstring and regenerate. -->", "",
           "A scenario is a TOML file (`desim run FILE.toml`, `desim compare FILE.toml`). Every field below "
           "can also be set on the command line with `--set PATH=VALUE`, where PATH joins the tables and "
           "list indices with dots (`--set vm.vcpus=8`, `--set phases.1.accesses=20000`, "
           "`--set profile_overrides.kernel.backing='\"thp\"'`; the value is read as TOML). Unknown fields "
           "are refused. `desim show` prints a scenario with every default filled in.", ""]
    touch = set(TouchSpec.model_fields)
    for table, model, inherit in SECTIONS:
        out.append(f"## {table}")
        out.append("")
        if _doc(model):
            out += [_doc(model), ""]
        skip = set()
        if inherit == "touch":
            skip = touch - {"pattern"}
            out += ["A phase is also a touch of its own: every field of `[[phases.touches]]` (below) can be "
                    "given directly in `[[phases]]`; `pattern` additionally accepts `\"none\"`.", ""]
        out += field_rows(model, skip)
        out.append("")
    out += ["## Host profile: kernel (`[kernel]` of a profile, `[profile_overrides.kernel]` of a scenario)", "",
            _doc(Kernel), ""]
    out += field_rows(Kernel)
    out += ["", "## Host profile: costs (`[costs.NAME]` of a profile, `[profile_overrides.costs]` of a scenario)", "",
            "Each cost in a profile is `{ value = <ns>, source = \"...\" }` (optionally `ci95 = [low, high]`); "
            "an override gives the value in ns only. `desim show` prints a profile's costs with their sources.",
            "", "| cost | unit | what it is |", "|---|---|---|"]
    out += [f"| `{k}` | ns | {_cell(v)} |" for k, v in COST_NAMES.items()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m desim.docs",
                                 description="Write (or check) the scenario reference generated from the models.")
    ap.add_argument("--out", type=Path, default=DEFAULT_PATH, help=f"the file (default {DEFAULT_PATH})")
    ap.add_argument("--check", action="store_true", help="exit 1 if the file is not current, write nothing")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is not current: run python -m desim.docs", file=sys.stderr)
            return 1
        print(f"{args.out} is current")
        return 0
    if not args.out.parent.is_dir():
        print(f"desim: error: --out {args.out}: directory {args.out.parent} does not exist", file=sys.stderr)
        return 2
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
