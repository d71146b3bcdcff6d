"""Sweep files: which scenario points, policies, replications and metrics a sweep runs.

A sweep file is TOML (top-level keys first, then the tables)::

    name = "vcpus-x-rom"                     # names the sweep in the store and the output folder
    scenario = "scenario.toml"               # relative to this file; omitted: the built-in default
    policies = ["fast", "targeted"]          # default: both
    replications = 5                         # fixed per point, or:
    # precision = 0.02                       # sequential: add replications per point until every
    # precision_metrics = ["completion_ns"]  #   watched metric's CI is within +-2% (paired ratio
    # min_replications = 3                   #   CI with two policies, mean CI with one),
    # max_replications = 30                  #   at most max_replications
    metrics = ["faults", "completion_ns"]    # kept in the tables (default: desim compare's set)
    seed = 1
    zip = [["vm.vcpus", "vm.memslots.0.size"]]          # factors that vary together
    exclude = [{ "vm.vcpus" = 64, profile = "legacy-2020" }]   # drop these combinations
    where = ["vm.vcpus <= 16 or profile == 'tdp-icelake'"]     # keep points where this holds

    [set]                                    # fixed overrides of every point
    "profile_overrides.kernel.backing" = "4k"

    [factors]                                # dotted scenario paths -> values
    vm.vcpus = [1, 8, 64]
    vm.memslots.0.size = ["64MiB", "256MiB", "1GiB"]
    profile = ["tdp-icelake", "legacy-2020"]

Points are the full factorial product of the factors, where each ``zip`` group
counts as one factor whose values advance together; then ``exclude`` drops
points matching every key of one entry, and ``where`` keeps points for which
each expression is true (comparisons, arithmetic, ``and``/``or``/``not`` on
factor paths; sizes such as ``'64MiB'`` -- quoted -- compare as bytes). Every point is
built and validated before any work starts; a bad factor, value or point is
one error naming it.
"""
from __future__ import annotations

import ast
import itertools
import operator
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DesimInputError
from ..scenario import Scenario, load_scenario, parse_size

TOP_KEYS = {"name", "scenario", "policies", "replications", "precision", "precision_metrics", "min_replications",
            "max_replications", "metrics", "seed", "zip", "exclude", "where", "set", "factors", "description",
            "confidence", "batch"}
DEFAULT_METRICS = [
    "faults", "faults_after_zap", "fault_latency_p50_ns", "fault_latency_p99_ns", "vcpu_stall_ns",
    "lock_wait_fault_ns", "ipis_sent", "remote_flushes", "zap_duration_total_ns", "memslot_ioctl_mean_ns",
    "completion_ns",
]


@dataclass
class SweepPoint:
    index: int
    labels: dict[str, Any]   # factor path -> value as written in the sweep file
    scenario: Scenario


@dataclass
class SweepSpec:
    name: str
    source: str
    base: Scenario
    factors: dict[str, list[Any]]
    points: list[SweepPoint]
    policies: list[str] = field(default_factory=lambda: ["fast", "targeted"])
    replications: int = 5
    precision: float | None = None
    precision_metrics: list[str] = field(default_factory=lambda: ["completion_ns"])
    min_replications: int = 3
    max_replications: int = 30
    batch: int = 2
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    seed: int = 1
    confidence: float = 0.95

    @property
    def factor_names(self) -> list[str]:
        return list(self.factors)

    def task_count(self) -> str:
        """The number of tasks (a range with sequential replications)."""
        per = len(self.points) * len(self.policies)
        if self.precision is None:
            return f"{per * self.replications}"
        return f"{per * self.min_replications} to {per * self.max_replications}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TOML dotted keys (``vm.vcpus = ...`` is a nested table) back to dotted paths."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, path + "."))
        else:
            out[path] = v
    return out


def _same(a: Any, b: Any) -> bool:
    if a == b:
        return True
    try:
        return parse_size(a) == parse_size(b)
    except Exception:  # noqa: BLE001 - not sizes: different
        return False


def _where_value(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return parse_size(v)
        except Exception:  # noqa: BLE001 - not a size: the string itself
            return v
    return v


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
           ast.LShift: operator.lshift, ast.RShift: operator.rshift}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
           ast.NotIn: lambda a, b: a not in b}


class _Where:
    """A ``where`` expression over factor paths, evaluated without ``eval``."""

    def __init__(self, text: str, factors: list[str], where: str) -> None:
        self.text = text
        self.names: dict[str, str] = {}
        src = text
        for i, f in enumerate(sorted(factors, key=len, reverse=True)):
            ident = f"_f{i}_"
            pat = r"(?<![\w.])" + re.escape(f) + r"(?![\w.])"
            if re.search(pat, src):
                src = re.sub(pat, ident, src)
                self.names[ident] = f
        try:
            self.tree = ast.parse(src, mode="eval")
        except SyntaxError as e:
            raise DesimInputError(f"{where}: where {text!r}: not an expression ({e.msg})") from None
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Name) and node.id not in self.names and node.id not in ("True", "False"):
                raise DesimInputError(f"{where}: where {text!r}: '{node.id}' is not a factor "
                                      f"(factors: {', '.join(factors)})")
            if not isinstance(node, (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub,
                                     ast.BinOp, ast.Compare, ast.Name, ast.Load, ast.Constant, ast.List, ast.Tuple,
                                     *_BINOPS, *_CMPOPS)):
                raise DesimInputError(f"{where}: where {text!r}: '{type(node).__name__}' is not allowed "
                                      f"(use comparisons, arithmetic, and/or/not)")

    def __call__(self, labels: dict[str, Any]) -> bool:
        env = {ident: _where_value(labels[f]) for ident, f in self.names.items()}
        try:
            return bool(self._eval(self.tree.body, env))
        except (TypeError, ZeroDivisionError, ValueError) as e:
            raise DesimInputError(f"where {self.text!r} at {labels}: {e}") from None

    def _eval(self, n: ast.AST, env: dict[str, Any]) -> Any:
        if isinstance(n, ast.Constant):
            return _where_value(n.value)
        if isinstance(n, ast.Name):
            return env[n.id] if n.id in env else n.id == "True"
        if isinstance(n, (ast.List, ast.Tuple)):
            return [self._eval(e, env) for e in n.elts]
        if isinstance(n, ast.BoolOp):
            vals = (self._eval(v, env) for v in n.values)
            return all(vals) if isinstance(n.op, ast.And) else any(vals)
        if isinstance(n, ast.UnaryOp):
            v = self._eval(n.operand, env)
            return (not v) if isinstance(n.op, ast.Not) else -v
        if isinstance(n, ast.BinOp):
            return _BINOPS[type(n.op)](self._eval(n.left, env), self._eval(n.right, env))
        if isinstance(n, ast.Compare):
            left = self._eval(n.left, env)
            for op, right in zip(n.ops, n.comparators):
                r = self._eval(right, env)
                if not _CMPOPS[type(op)](left, r):
                    return False
                left = r
            return True
        raise TypeError(type(n).__name__)


def _typed(data: dict[str, Any], key: str, types: type | tuple, where: str, default: Any) -> Any:
    v = data.get(key, default)
    if v is default:
        return v
    if not isinstance(v, types) or isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        want = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise DesimInputError(f"{where}: '{key}' must be {want}, got {v!r}")
    return v


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read and check a sweep file; build and validate every point (no task runs here)."""
    p = Path(path)
    if not p.is_file():
        raise DesimInputError(f"{p}: sweep file not found")
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise DesimInputError(f"{p}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise DesimInputError(f"{p}: not valid TOML: {e}") from None
    return sweep_from_dict(data, str(p), p.parent, overrides)


def sweep_from_dict(data: dict[str, Any], where: str = "sweep", base_dir: Path | None = None,
                    overrides: dict[str, Any] | None = None) -> SweepSpec:
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise DesimInputError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(TOP_KEYS))})")
    name = _typed(data, "name", str, where, Path(where).stem)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise DesimInputError(f"{where}: name {name!r}: use letters, digits, '-', '_' and '.'")
    sc_path = _typed(data, "scenario", str, where, None)
    if sc_path is not None:
        sp = Path(sc_path)
        if not sp.is_absolute() and base_dir is not None and (base_dir / sp).is_file():
            sp = base_dir / sp
        base = load_scenario(sp)
    else:
        base = load_scenario(None)
    fixed = flatten(_typed(data, "set", dict, where, {}))
    fixed.update(overrides or {})
    if fixed:
        try:
            base = base.with_overrides(fixed)
        except DesimInputError as e:
            raise DesimInputError(f"{where}: [set]: {e}") from None

    policies = _typed(data, "policies", list, where, ["fast", "targeted"])
    if not policies or len(set(policies)) != len(policies) or not set(policies) <= {"fast", "targeted"}:
        raise DesimInputError(f"{where}: policies {policies!r}: one or both of 'fast', 'targeted', each once")
    spec_kw: dict[str, Any] = {"policies": list(policies)}
    for key, lo in (("replications", 1), ("min_replications", 2), ("max_replications", 2), ("batch", 1),
                    ("seed", 0)):
        v = _typed(data, key, int, where, None)
        if v is not None:
            if v < lo:
                raise DesimInputError(f"{where}: {key} = {v}: must be >= {lo}")
            spec_kw[key] = v
    prec = _typed(data, "precision", (int, float), where, None)
    if prec is not None:
        if not 0 < prec < 1:
            raise DesimInputError(f"{where}: precision = {prec}: a fraction between 0 and 1, e.g. 0.02")
        if "replications" in spec_kw:
            raise DesimInputError(f"{where}: give 'replications' (fixed) or 'precision' (sequential), not both")
        spec_kw["precision"] = float(prec)
    conf = _typed(data, "confidence", float, where, None)
    if conf is not None:
        if not 0 < conf < 1:
            raise DesimInputError(f"{where}: confidence = {conf}: between 0 and 1, e.g. 0.95")
        spec_kw["confidence"] = conf
    if spec_kw.get("min_replications", 3) > spec_kw.get("max_replications", 30):
        raise DesimInputError(f"{where}: min_replications is above max_replications")

    factors = {k: v for k, v in flatten(_typed(data, "factors", dict, where, {})).items()}
    for f, vals in factors.items():
        if not isinstance(vals, list) or not vals:
            raise DesimInputError(f"{where}: factor {f}: give a non-empty list of values, e.g. {f} = [1, 2]")
    zips = _typed(data, "zip", list, where, [])
    grouped: set[str] = set()
    groups: list[list[str]] = []
    for g in zips:
        if not isinstance(g, list) or len(g) < 2 or not all(isinstance(x, str) for x in g):
            raise DesimInputError(f"{where}: zip entry {g!r}: a list of two or more factor names")
        for f in g:
            if f not in factors:
                raise DesimInputError(f"{where}: zip names '{f}', which is not a factor "
                                      f"(factors: {', '.join(factors) or 'none'})")
            if f in grouped:
                raise DesimInputError(f"{where}: factor {f} is in two zip groups")
            grouped.add(f)
        lens = {f: len(factors[f]) for f in g}
        if len(set(lens.values())) > 1:
            raise DesimInputError(f"{where}: zip {g}: the factors must have as many values each ({lens})")
        groups.append(list(g))
    groups += [[f] for f in factors if f not in grouped]

    excludes = []
    for e in _typed(data, "exclude", list, where, []):
        if not isinstance(e, dict) or not e:
            raise DesimInputError(f"{where}: exclude entry {e!r}: a table of factor = value")
        e = flatten(e)
        for f in e:
            if f not in factors:
                raise DesimInputError(f"{where}: exclude names '{f}', which is not a factor "
                                      f"(factors: {', '.join(factors) or 'none'})")
        excludes.append(e)
    wheres = _typed(data, "where", (list, str), where, [])
    wheres = [wheres] if isinstance(wheres, str) else wheres
    conds = []
    for w in wheres:
        if not isinstance(w, str):
            raise DesimInputError(f"{where}: where entry {w!r}: an expression in a string")
        conds.append(_Where(w, list(factors), where))

    labels_list = []
    for combo in itertools.product(*(range(len(factors[g[0]])) for g in groups)):
        labels = {}
        for g, i in zip(groups, combo):
            for f in g:
                labels[f] = factors[f][i]
        labels = {f: labels[f] for f in factors}  # file order
        if any(all(_same(labels[f], v) for f, v in e.items()) for e in excludes):
            continue
        if not all(c(labels) for c in conds):
            continue
        labels_list.append(labels)
    if not labels_list:
        raise DesimInputError(f"{where}: exclude/where leave no point to run")
    points = []
    for i, labels in enumerate(labels_list):
        try:
            sc = base.with_overrides(labels) if labels else base
        except DesimInputError as e:
            raise DesimInputError(f"{where}: point {i} ({_fmt_labels(labels)}): {e}") from None
        points.append(SweepPoint(i, labels, sc))

    spec = SweepSpec(name=name, source=where, base=base, factors=factors, points=points, **spec_kw)
    metrics = _typed(data, "metrics", list, where, None)
    if metrics is not None:
        spec.metrics = list(metrics)
    pm = _typed(data, "precision_metrics", list, where, None)
    if pm is not None:
        spec.precision_metrics = list(pm)
    for key, names in (("metrics", spec.metrics), ("precision_metrics", spec.precision_metrics)):
        for m in names:
            if not isinstance(m, str) or not any(known_metric(m, pt.scenario) for pt in points):
                raise DesimInputError(f"{where}: {key}: unknown metric {m!r} (e.g. {', '.join(DEFAULT_METRICS[:6])}, "
                                      f"phase_<name>_ns, lock_wait_<role>_ns; `desim run` prints them)")
    return spec


def _fmt_labels(labels: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in labels.items())


_STATIC_METRICS: set[str] | None = None
_LOCK_METRIC = re.compile(r"lock_(wait|hold)_[a-z_]+_ns|lock_(acquisitions|contended)_[a-z_]+")


def known_metric(name: str, scenario: Scenario) -> bool:
    """Whether a run of ``scenario`` reports metric ``name`` (checked before any run)."""
    global _STATIC_METRICS
    if _STATIC_METRICS is None:
        from ..vm import Vm

        vm = Vm(load_scenario(None), "fast")  # the names every run reports (a small VM: cheap to build)
        _STATIC_METRICS = set(vm.metrics.summary(vm.lock.summary()))
    if name in _STATIC_METRICS or _LOCK_METRIC.fullmatch(name):
        return True
    if name.startswith("faults_"):
        return True  # faults by cause
    return any(name == f"phase_{ph.name}_ns" for ph in scenario.phases)
