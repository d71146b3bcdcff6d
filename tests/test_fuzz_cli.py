"""A generated corpus of hostile inputs, run in-process through ``desim.cli.main``.

Every input must end in exit status 0 with valid output (``summary.json`` strict
JSON, ``vcpus.csv`` or the tables present) or exit status 2 with exactly one line
``desim: error: ...`` on stderr and nothing written (no output directory, no
store, no temporary directory left behind). A traceback, any other exit status
or a partial file fails the test.

Five categories, each a Hypothesis strategy: scenario TOML (a small valid
scenario with 1-3 mutations: hostile values in real fields, unknown fields,
deleted fields, duplicated phases or slots, extra memslot ops; and byte-level
damage: truncation, non-UTF-8 bytes, deep nesting), ``--set`` overrides, QEMU
memslot traces and perf traces (mutated real lines, replayed by a scenario),
and CLI argument lists (flags and values of ``run``/``compare``/``show``).

CI runs a few hundred inputs with a fixed seed (derandomized: the same corpus
each run); ``DESIM_FUZZ_SCALE=10`` runs ten times as many, freshly random.
``DESIM_FUZZ_REPORT=FILE`` writes how each category's inputs ended.

To keep each run short the work limits are lowered for this test
(:mod:`desim.limits`: 300,000 accesses, 200 memslot ioctls per run) and the
host is said to have 512 MiB available, so the same refusal paths that guard
large runs are exercised by small inputs.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from desim import limits
from desim.cli import main

SCALE = int(os.environ.get("DESIM_FUZZ_SCALE", "1"))
ROOT = Path(__file__).resolve().parents[1] / "workloads" / "traces"
OUTCOMES: dict[str, Counter] = defaultdict(Counter)
EXAMPLES: dict[str, list[str]] = defaultdict(list)  # a few error lines per kind, for the report


def _settings(n: int):
    return settings(max_examples=n * SCALE, deadline=None, derandomize=SCALE == 1, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def _small_limits(monkeypatch):
    monkeypatch.setattr(limits, "MAX_ACCESSES_PER_RUN", 300_000)
    monkeypatch.setattr(limits, "MAX_MEMSLOT_IOCTLS_PER_RUN", 200)
    monkeypatch.setattr(limits, "MAX_IOCTL_VCPU_WORK_PER_RUN", 20_000)
    monkeypatch.setattr(limits, "available_memory", lambda: 512 << 20)


def teardown_module() -> None:
    path = os.environ.get("DESIM_FUZZ_REPORT")
    if path:
        Path(path).write_text(json.dumps({"outcomes": {k: dict(v) for k, v in OUTCOMES.items()},
                                          "examples": EXAMPLES}, indent=1, sort_keys=True))


# ---- running one input -----------------------------------------------------------------------

def _strict_json(text: str) -> object:
    def refuse(c: str) -> None:
        raise AssertionError(f"summary.json is not strict JSON: {c}")
    return json.loads(text, parse_constant=refuse)


def _snapshot(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def run_cli(category: str, argv: list[str], work: Path, out: Path | None = None,
            store: Path | None = None) -> int:
    """Run ``desim argv`` in-process and check how it ended."""
    before = _snapshot(work)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: --help, or a bad argument
            rc = e.code if isinstance(e.code, int) else 2
    err = stderr.getvalue()
    assert "Traceback" not in err, (argv, err)
    assert rc in (0, 2), (argv, rc, err)
    leftovers = [p for p in _snapshot(work) - before if "/." in "/" + p or p.startswith(".")]
    assert not leftovers, (argv, leftovers)
    if rc == 2:
        assert err.startswith("desim: error: ") and err.endswith("\n") and err.count("\n") == 1, (argv, err)
        assert len(err) < 4000, (argv, err[:200])
        assert _snapshot(work) == before, (argv, "exit 2 but files were written", _snapshot(work) - before)
        kind = _kind(err)
        OUTCOMES[category]["exit 2: " + kind] += 1
        if len(EXAMPLES[kind]) < 4:
            EXAMPLES[kind].append(err.strip()[:300])
        return rc
    # exit 0: whatever was asked to be written is complete
    if out is not None and "--help" not in argv and "-h" not in argv:
        files = {p.name for p in out.iterdir()}
        if argv[0] == "run":
            assert {"summary.json", "vcpus.csv"} <= files, (argv, files)
        else:
            assert {"summary.json", "runs.csv", "comparison.csv"} <= files, (argv, files)
        summary = _strict_json((out / "summary.json").read_text())
        assert isinstance(summary, dict)
    if store is not None and argv[0] == "compare" and "--help" not in argv:
        assert store.is_dir()
    OUTCOMES[category]["exit 0"] += 1
    return rc


def _kind(err: str) -> str:
    """A coarse label of the error for the report (which check refused the input)."""
    e = err.lower()
    for needle, label in [("not valid toml", "TOML syntax"), ("nested", "TOML depth"), ("utf-8", "UTF-8"),
                          ("unknown field", "unknown field"), ("finite", "NaN/inf"),
                          ("must be an integer", "strict type"), ("must be a number", "strict type"),
                          ("must be true or false", "strict type"), ("must be a string", "strict type"),
                          ("must be a ", "strict type"), ("appears twice", "duplicate"),
                          ("kvm_mem_max_nr_pages", "KVM slot size"), ("address space", "KVM gpa width"),
                          ("overlap", "overlap"), ("would need", "memory estimate"),
                          ("over the limit", "work estimate"), ("time_limit_ms", "time limit"),
                          ("expected field=value", "--set path"), ("is not an index", "--set path"),
                          ("does not name a field", "--set path"), ("empty field name", "--set path"), ("--out", "output path"), ("--store", "output path"),
                          ("--metrics", "--metrics"), ("--scheduler", "--scheduler"),
                          ("as a size", "size syntax"), ("cannot read", "input file"), ("cannot open", "input file"),
                          ("argument", "argparse"), (".log:", "trace content"),
                          (".txt:", "trace content"), ("trace", "trace content"), ("input should be", "bad value"),
                          ("no such slot", "VMM script"), ("slot", "memslot"), ("greater than", "bounds"),
                          ("less than", "bounds"), ("required field", "missing field"), ("profile", "profile")]:
        if needle in e:
            return label
    return "other"


# ---- TOML --------------------------------------------------------------------------------------

def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml_doc(d: dict) -> str:
    return "".join(f"{json.dumps(str(k))} = {toml_value(v)}\n" for k, v in d.items())


def base_scenario() -> dict:
    return {
        "name": "fuzz",
        "vm": {"vcpus": 2, "memslots": [{"id": 0, "gpa": 0, "size": "8MiB"}]},
        "phases": [
            {"name": "populate", "pattern": "sequential", "slot": 0},
            {"name": "work", "pattern": "uniform", "slot": 0, "accesses": 2000,
             "memslot_ops": [{"at_us": 10, "op": "create", "slot": 5, "gpa": "8TiB", "size": "64KiB"},
                             {"at_us": 50, "op": "delete", "slot": 5}]},
        ],
    }


FIELD_PATHS = [
    "name", "profile", "policy", "zap_control", "time_limit_ms", "description", "vm.vcpus",
    "vm.memslots.0.id", "vm.memslots.0.gpa", "vm.memslots.0.size", "vm.memslots.0.flags", "vm.memslots.0.ua",
    "vm.memslots.0.backing", "vm.memslots.0.prealloc", "phases.0.name", "phases.0.vcpus", "phases.0.pattern",
    "phases.0.slot", "phases.0.passes", "phases.0.sharing", "phases.0.access_ns", "phases.0.offset",
    "phases.0.size", "phases.0.gpa", "phases.0.until", "phases.1.accesses", "phases.1.pattern",
    "phases.1.zipf_s", "phases.1.hot_fraction", "phases.1.hot_probability", "phases.1.vcpus", "phases.1.name",
    "phases.1.memslot_ops.0.at_us", "phases.1.memslot_ops.0.op", "phases.1.memslot_ops.0.slot",
    "phases.1.memslot_ops.0.gpa", "phases.1.memslot_ops.0.size", "phases.1.memslot_ops.0.repeat",
    "phases.1.memslot_ops.0.every_us", "phases.1.memslot_ops.0.hold_us", "phases.1.memslot_ops.0.poisson",
    "phases.1.memslot_ops.1.at_us", "phases.1.memslot_ops.1.slot", "phases.1.memslot_trace",
    "profile_overrides.costs.vm_exit", "profile_overrides.costs.spte_zap", "profile_overrides.kernel.backing",
    "profile_overrides.kernel.preemption", "profile_overrides.kernel.phys_bits", "profile_overrides.kernel.mmu",
]

HOSTILE = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2, 3, 4096, 4097, 2**31, 2**32, 2**52, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.5, 1e300, -0.0]),
    st.booleans(),
    st.sampled_from(["", "yes", "1", "true", "64KiB", "1000TiB", "9TiB", "4TiB", "0x1000", "0x", "-4096",
                     "all", "bsp", "aps", "fast", "targeted", "tdp-icelake", "legacy-2020", "shadow", "x" * 300,
                     "/dev/zero", "sequential", "zipf", "hotcold", "none", "trace", "delete", "create", "move",
                     "toggle", "flags", "vmm", "4k", "thp", "shared", "1.5GiB", "8 parsecs", "\u00e9\u00e8"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.lists(st.integers(-3, 3), max_size=3),
    st.lists(st.sampled_from(["readonly", "log_dirty", "bogus"]), max_size=2),
    st.dictionaries(st.sampled_from(["a", "value", "path", "op"]), st.integers(-2, 5), max_size=2),
)


# values a user could mean, per field: half of the "set" mutations use one, so that valid runs are reached too
PLAUSIBLE = {
    "name": ["other"], "profile": ["legacy-2020", "shadow-pvm", "tdp-icelake"], "policy": ["fast", "targeted"],
    "zap_control": [0, 1], "time_limit_ms": [50.0, 1e6], "description": ["d"], "vm.vcpus": [1, 3, 8],
    "vm.memslots.0.id": [0, 7], "vm.memslots.0.gpa": [0, "1GiB"], "vm.memslots.0.size": ["4MiB", "16MiB", 8192, "16GiB", "4TiB"],
    "vm.memslots.0.flags": [["readonly"], 1], "vm.memslots.0.ua": ["1GiB"],
    "vm.memslots.0.backing": ["4k", "thp", "hugetlbfs-1g"], "vm.memslots.0.prealloc": [True, False],
    "phases.0.name": ["boot"], "phases.0.vcpus": [1, 2, "bsp", "aps"], "phases.0.pattern": ["zipf", "none"],
    "phases.0.slot": [0], "phases.0.passes": [2, 3, 10**4], "phases.0.sharing": ["shared"], "phases.0.access_ns": [50],
    "phases.0.offset": ["1MiB"], "phases.0.size": ["1MiB"], "phases.0.gpa": ["1MiB"], "phases.0.until": ["done"],
    "phases.1.accesses": [1, 50_000, 10**6], "phases.1.pattern": ["zipf", "hotcold", "sequential"],
    "phases.1.zipf_s": [0.8, 2], "phases.1.hot_fraction": [0.5], "phases.1.hot_probability": [0.1],
    "phases.1.vcpus": [1, "all"], "phases.1.name": ["w2"], "phases.1.memslot_ops.0.at_us": [0, 99.5],
    "phases.1.memslot_ops.0.op": ["toggle"], "phases.1.memslot_ops.0.slot": [6],
    "phases.1.memslot_ops.0.gpa": ["32MiB"], "phases.1.memslot_ops.0.size": ["2MiB"],
    "phases.1.memslot_ops.0.repeat": [2, 3], "phases.1.memslot_ops.0.every_us": [20],
    "phases.1.memslot_ops.0.hold_us": [5], "phases.1.memslot_ops.0.poisson": [True],
    "phases.1.memslot_ops.1.at_us": [30, 80], "phases.1.memslot_ops.1.slot": [5],
    "phases.1.memslot_trace": [{"path": str(ROOT / "qemu-7.2" / "seabios-pc-6G.memslots.log"), "timing": "ordered"}],
    "profile_overrides.costs.vm_exit": [100, 500.5], "profile_overrides.costs.spte_zap": [0, 30],
    "profile_overrides.kernel.backing": ["4k", "thp"], "profile_overrides.kernel.preemption": [False],
    "profile_overrides.kernel.phys_bits": [39, 52], "profile_overrides.kernel.mmu": ["legacy"],
}


def _set(d: object, path: str, value: object) -> None:
    parts = path.split(".")
    for p in parts[:-1]:
        if isinstance(d, list):
            i = int(p)
            if i >= len(d):
                return
            d = d[i]
        elif isinstance(d, dict):
            d = d.setdefault(p, {})
            if not isinstance(d, (dict, list)):
                return
        else:
            return
    last = parts[-1]
    if isinstance(d, dict):
        d[last] = value
    elif isinstance(d, list) and last.isdecimal() and int(last) < len(d):
        d[int(last)] = value


def _delete(d: object, path: str) -> None:
    parts = path.split(".")
    for p in parts[:-1]:
        d = d[int(p)] if isinstance(d, list) and p.isdecimal() and int(p) < len(d) else (
            d.get(p) if isinstance(d, dict) else None)
        if d is None:
            return
    if isinstance(d, dict):
        d.pop(parts[-1], None)


@st.composite
def scenario_texts(draw) -> bytes:
    d = base_scenario()
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["set", "set", "set", "delete", "unknown", "dup_phase", "dup_slot", "op",
                                     "slot", "touches", "trace_path"]))
        if kind == "set":
            path = draw(st.sampled_from(FIELD_PATHS))
            _set(d, path, draw(st.one_of(st.sampled_from(PLAUSIBLE[path]), HOSTILE)))
        elif kind == "delete":
            _delete(d, draw(st.sampled_from(FIELD_PATHS)))
        elif kind == "unknown":
            _set(d, draw(st.sampled_from(["colour", "vm.colour", "phases.0.colour", "vm.memslots.0.colour"])),
                 draw(HOSTILE))
        elif kind == "dup_phase" and isinstance(d.get("phases"), list) and d["phases"]:
            d["phases"].append(json.loads(json.dumps(d["phases"][0], allow_nan=True)))
        elif kind == "dup_slot" and isinstance(d.get("vm"), dict) and isinstance(d["vm"].get("memslots"), list):
            d["vm"]["memslots"].append({"id": draw(st.integers(0, 6)), "gpa": draw(HOSTILE), "size": "4MiB"})
        elif kind == "op" and isinstance(d.get("phases"), list) and len(d["phases"]) > 1 \
                and isinstance(d["phases"][1], dict):
            op = {"at_us": draw(st.one_of(st.floats(0, 1e4), HOSTILE)),
                  "op": draw(st.sampled_from(["create", "delete", "move", "flags", "toggle", "bogus"])),
                  "slot": draw(st.one_of(st.integers(0, 6), HOSTILE))}
            for k in draw(st.lists(st.sampled_from(["gpa", "size", "hold_us", "repeat", "every_us", "poisson",
                                                    "flags"]), max_size=4, unique=True)):
                op[k] = draw(st.one_of(st.sampled_from(["32MiB", "64KiB", 4096, 100, 3, True]), HOSTILE))
            d["phases"][1].setdefault("memslot_ops", []).append(op)
        elif kind == "slot" and isinstance(d.get("vm"), dict):
            d["vm"].setdefault("memslots", []).append(
                {"id": draw(st.integers(1, 4)), "gpa": draw(st.sampled_from(["32MiB", "4GiB", "0x3fffffffff000",
                                                                           "0xfffffffffffff000", 2**46])),
                 "size": draw(st.sampled_from(["4KiB", "2MiB", "1GiB", "8TiB", "16TiB"]))})
        elif kind == "touches" and isinstance(d.get("phases"), list) and d["phases"] \
                and isinstance(d["phases"][0], dict):
            d["phases"][0]["touches"] = [{"pattern": draw(st.sampled_from(["zipf", "hotcold", "sequential",
                                                                           "trace"])),
                                          "slot": 0, "accesses": draw(st.one_of(st.integers(-5, 10**6), HOSTILE)),
                                          "vcpus": draw(st.one_of(st.integers(-2, 5), HOSTILE)),
                                          "until": draw(st.sampled_from(["done", "vmm"]))}]
        elif kind == "trace_path" and isinstance(d.get("phases"), list) and len(d["phases"]) > 1 \
                and isinstance(d["phases"][1], dict):
            d["phases"][1]["memslot_trace"] = {
                "path": draw(st.sampled_from(["/dev/zero", "/dev/null", "/", "/nonexistent.log", "",
                                              "x" * 300, str(ROOT / "qemu-7.2" / "seabios-pc-6G.memslots.log")])),
                "address_space": draw(st.one_of(st.integers(-2, 3), HOSTILE)),
                "timing": draw(st.sampled_from(["scaled", "ordered", "bogus"]))}
    text = toml_doc(d).encode()
    damage = draw(st.sampled_from(["none"] * 16 + ["truncate", "bytes", "deep", "dup_key"]))
    if damage == "truncate":
        text = text[:draw(st.integers(0, len(text)))]
    elif damage == "bytes":
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.binary(min_size=1, max_size=4)) + text[i:]
    elif damage == "deep":
        n = draw(st.integers(30, 3000))
        text += b"deep = " + b"[" * n + b"]" * n + b"\n"
    elif damage == "dup_key":
        text += b'name = "again"\n'
    return text


@given(text=scenario_texts())
@_settings(120)
def test_fuzz_scenario_files(tmp_path_factory, text):
    work = tmp_path_factory.mktemp("fz")
    (work / "s.toml").write_bytes(text)
    run_cli("scenario TOML", ["run", str(work / "s.toml"), "--out", str(work / "out")], work, work / "out")


# ---- --set -------------------------------------------------------------------------------------

SET_PATHS = FIELD_PATHS + ["phases.-1.name", "phases.9.name", "phases.x.name", "vm..vcpus", "", ".",
                           "vm.memslots.-1.size", "phases.0.vcpus.x", "vm.vcpus.0", "phases.01.name",
                           "profile_overrides.costs.nosuch", "profile_overrides.kernel.nosuch", "x" * 300]


@st.composite
def set_args(draw) -> list[str]:
    out = []
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(SET_PATHS if draw(st.integers(0, 3)) == 0 else FIELD_PATHS))
        plausible = st.sampled_from(PLAUSIBLE.get(path, [1])).map(toml_value)
        value = draw(st.one_of(plausible, plausible, HOSTILE.map(toml_value),
                               st.sampled_from(["", "=", "abc", "[1,", "{", "1_000", "0x10", "1e999", "'q'",
                                                '"x', "1 2", "true false", "[" * 40 + "]" * 40,
                                                "[" * 3000 + "]" * 3000, "{a = {b = {c = 1}}}"]),
                               st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8)))
        out += ["--set", f"{path}={value}" if draw(st.integers(0, 9)) else path]
    return out


@given(sets=set_args())
@_settings(90)
def test_fuzz_set_overrides(tmp_path_factory, sets):
    work = tmp_path_factory.mktemp("fz")
    (work / "s.toml").write_text(toml_doc(base_scenario()))
    run_cli("--set", ["run", str(work / "s.toml"), *sets, "--out", str(work / "out")], work, work / "out")


# ---- traces ------------------------------------------------------------------------------------

QEMU_LINES = (ROOT / "qemu-7.2" / "seabios-pc-6G.memslots.log").read_bytes().splitlines()
PERF_FILES = sorted((ROOT / "perf").glob("*.txt"))
PERF_LINES = PERF_FILES[0].read_bytes().splitlines() if PERF_FILES else []


@st.composite
def mutated_lines(draw, lines: list[bytes]) -> bytes:
    lines = list(lines)
    for _ in range(draw(st.integers(0, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        pos = draw(st.integers(0, len(line)))
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "flip", "truncate", "insert", "number"]))
        if kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, line)
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "flip" and line:
            pos = min(pos, len(line) - 1)
            lines[i] = line[:pos] + bytes([draw(st.integers(0, 255))]) + line[pos + 1:]
        elif kind == "truncate":
            lines[i] = line[:pos]
        elif kind == "insert":
            lines[i] = line[:pos] + draw(st.binary(min_size=1, max_size=6)) + line[pos:]
        elif kind == "number":
            lines[i] = line[:pos] + draw(st.sampled_from([b"0xffffffffffffffff", b"0x80000000000", b"-1",
                                                          b"99999999999999999999", b"0x0"])) + line[pos:]
    return b"\n".join(lines) + b"\n"


@given(data=mutated_lines(QEMU_LINES), timing=st.sampled_from(["scaled", "ordered"]),
       address_space=st.sampled_from([0, 1, -1, 2]))
@_settings(60)
def test_fuzz_qemu_traces(tmp_path_factory, data, timing, address_space):
    work = tmp_path_factory.mktemp("fz")
    (work / "t.log").write_bytes(data)
    sc = {"name": "qemu-fuzz", "vm": {"vcpus": 1},
          "phases": [{"name": "boot", "pattern": "none",
                      "memslot_trace": {"path": str(work / "t.log"), "timing": timing, "gap_us": 10,
                                        "address_space": address_space}}]}
    (work / "s.toml").write_text(toml_doc(sc))
    run_cli("QEMU trace", ["run", str(work / "s.toml"), "--out", str(work / "out")], work, work / "out")


@pytest.mark.skipif(not PERF_LINES, reason="no perf fixture")
@given(data=mutated_lines(PERF_LINES))
@_settings(40)
def test_fuzz_perf_traces(tmp_path_factory, data):
    work = tmp_path_factory.mktemp("fz")
    (work / "p.txt").write_bytes(data)
    sc = {"name": "perf-fuzz", "vm": {"vcpus": 2, "memslots": [{"id": 0, "gpa": 0, "size": "64MiB"}]},
          "phases": [{"name": "replay", "pattern": "trace", "perf_trace": str(work / "p.txt")}]}
    (work / "s.toml").write_text(toml_doc(sc))
    run_cli("perf trace", ["run", str(work / "s.toml"), "--out", str(work / "out")], work, work / "out")


# ---- CLI argument lists ------------------------------------------------------------------------

PATH_VALUES = ["", "/proc/x", "/etc/passwd", "/dev/null", "/", "FILE", "NEWDIR", "NEWDIR/sub", "FILE/sub",
               "x" * 300, "EXISTING"]
FLAG_VALUES = {
    "--out": PATH_VALUES, "--store": PATH_VALUES,
    "--seed": ["-1", "0", "1", "2**64", "abc", "1e3", "18446744073709551616"],
    "-n": ["0", "1", "2", "-1", "x"], "--replications": ["1", "2", "0", "nan"],
    "--metrics": ["faults", "nosuch", "completion_ns", "phase_work_ns", "phase_nosuch_ns", ""],
    "--precision": ["0.5", "0", "2", "nan", "inf", "-1", "x"],
    "--confidence": ["0.9", "95", "0", "1", "nan", "x"],
    "--scheduler": ["tcp://", "inproc://x", "tcp://:8786", "http://x:1", "tcp://host:99999", "x", ""],
    "--workers": ["0", "-1", "1", "x"],
    "--policy": ["fast", "targeted", "sloppy", ""],
    "--replication": ["0", "1", "-1", "x"],
    "--set": ["vm.vcpus=1", "vm.vcpus=0", "phases.-1.name=x", "novalue", "phases.0.vcpus=true"],
}
SWITCHES = ["--no-plots", "--allow-large", "--steady", "--parquet", "--help", "--bogus", "-x"]


@st.composite
def cli_args(draw, work: Path) -> tuple[list[str], Path | None, Path | None]:
    cmd = draw(st.sampled_from(["run", "run", "compare", "compare", "show", "profiles", "nosuch"]))
    argv = [cmd]
    if draw(st.booleans()):
        argv.append(str(work / "s.toml"))
    out = store = None
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.integers(0, 4)) == 0:
            argv.append(draw(st.sampled_from(SWITCHES)))
            continue
        flag = draw(st.sampled_from(sorted(FLAG_VALUES)))
        v = draw(st.sampled_from(FLAG_VALUES[flag]))
        v = {"FILE": str(work / "file"), "NEWDIR": str(work / "new"), "NEWDIR/sub": str(work / "new" / "sub"),
             "FILE/sub": str(work / "file" / "sub"), "EXISTING": str(work / "existing")}.get(v, v)
        argv += [flag, v]
        if flag == "--out" and v.startswith(str(work)):
            out = Path(v)
        if flag == "--store" and v.startswith(str(work)):
            store = Path(v)
    if cmd == "compare":
        argv += ["-n", draw(st.sampled_from(["1", "2"])), "--no-plots"]
        if "--precision" in argv:
            argv[argv.index("-n"):argv.index("-n") + 2] = ["-n", "2"]
    if cmd in ("run", "compare", "show") and str(work / "s.toml") not in argv:
        argv.insert(1, str(work / "s.toml"))  # keep each run small: never the 256 MiB built-in default
    return argv, out, store


@given(data=st.data())
@_settings(90)
def test_fuzz_cli_arguments(tmp_path_factory, data):
    work = tmp_path_factory.mktemp("fz")
    (work / "s.toml").write_text(toml_doc(base_scenario()))
    (work / "file").write_text("x")
    (work / "existing").mkdir()
    argv, out, store = data.draw(cli_args(work))
    # the last --out/--store wins in argparse
    outs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"]
    stores = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--store"]
    out = Path(outs[-1]) if outs and outs[-1].startswith(str(work)) else None
    store = Path(stores[-1]) if stores and stores[-1].startswith(str(work)) else None
    run_cli("CLI arguments", argv, work, out, store)


# ---- fixed hostile inputs the strategies rarely reach -------------------------------------------

def test_special_files_and_sizes(tmp_path, monkeypatch):
    """Non-regular files, over-long names, a file over the size cap, a FIFO: one line each, exit 2."""
    from desim import inputfiles

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * 100 + "\n")
    monkeypatch.setattr(inputfiles, "MAX_TOML_BYTES", 50)
    (tmp_path / "bad.toml").write_bytes(b'name = "caf\xe9"\n')
    for i, arg in enumerate(["/dev/zero", str(fifo), str(big), str(tmp_path), str(tmp_path / ("x" * 300)),
                             str(tmp_path / "bad.toml"), str(tmp_path / "missing.toml")]):
        (tmp_path / f"w{i}").mkdir()
        assert run_cli("fixed", ["show", arg], tmp_path / f"w{i}") == 2
    for i, prof in enumerate(["x" * 300, "y" * 300 + ".toml", "/dev/zero", str(fifo), str(tmp_path / "bad.toml")]):
        (tmp_path / f"p{i}").mkdir()
        assert run_cli("fixed", ["show", "--set", f"profile={toml_value(prof)}"], tmp_path / f"p{i}") == 2
