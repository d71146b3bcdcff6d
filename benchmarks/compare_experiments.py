"""Before/after of every shipped experiment: run them at two git revisions and diff their outputs.

    python benchmarks/compare_experiments.py [--base bcc7ca2] [--head WORKTREE_OR_REV] [--modes quick,default]
        [--only vcpu_scaling,...] [--work DIR] [--engine reference] [--reuse] [--sides base,head] [--store]

Each experiment under ``experiments/`` runs at both revisions with the same interpreter, the same
arguments (``--quick`` and/or its defaults, one worker) and ``DESIM_ENGINE`` (default
``reference``: the plain SimPy loop), each in a checkout of its own revision (``git worktree add
--detach`` under ``--work``; a ``--head`` that is a directory is used as it is, e.g. this checkout
with uncommitted work). Each run has its checkout first on ``PYTHONPATH``, so each revision runs its
own ``desim`` and not the one installed in the interpreter's environment (most experiment scripts do not
put their checkout on ``sys.path`` themselves). Before running, the tool checks that ``import desim``
resolves inside each checkout, and afterwards that every ``model_version`` the outputs record is
that checkout's fingerprint: a run of the wrong code is reported, never compared. Each run also
leaves a record beside its outputs (``SIDE/NAME-MODE.run.json``: fingerprint, engine, exit status,
wall time), so outputs kept with ``--reuse`` are checked the same way, including those of
experiments that record no ``model_version`` themselves, and outputs of another ``--engine`` are
refused.

Then every JSON and CSV file the two runs wrote is compared value by value, to the last digit (CSV
cells as text, JSON values exactly), except fields that measure the run rather than the model:
wall-clock times (``wall_s``, ``run_wall_s``, ``cpu_s_per_run_mean``), the model fingerprint
(``model_version``: a hash of the source, different by construction), the output paths in ``args``
and the store. Figures (PNG/SVG) are not compared. One table: per experiment and mode, the files
compared and whether they are identical, or the first differences.

With ``--store`` each run keeps its replications in a result store under ``--work``
(``store-SIDE-NAME-MODE``, keyed by the model's fingerprint), so a long default-mode run that is
stopped resumes where it stopped when the same command is run again with ``--reuse`` (an experiment
without a ``--store`` option at its revision, such as ``recorded_time_map`` before ``--store`` was added
to it, runs without one).

``kvm_crossover`` measures this host's real KVM (its numbers differ from run to run); it runs only
with ``--kvm`` and then its real-run columns differ by nature.
"""
from __future__ import annotations

import argparse
import csv
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("vcpu_scaling", "slot_size_crossover", "preemption_lockbreak", "seed_claims", "recorded_time_map",
               "kvm_crossover")
NEEDS_KVM = {"kvm_crossover"}
# fields that describe the run, not the model's results
VOLATILE_KEYS = {"wall_s", "run_wall_s", "cpu_s_per_run_mean", "model_version", "out", "store", "scheduler",
                 "progress", "workers"}


def checkout(rev: str, work: Path) -> Path:
    """A directory holding ``rev``: the directory itself, or a detached worktree under ``work``."""
    if Path(rev).is_dir():
        return Path(rev).resolve()
    got = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", "--short=12", f"{rev}^{{commit}}"],
                         capture_output=True, text=True)
    if got.returncode:
        raise SystemExit(f"desim: error: --base/--head {rev!r}: neither a directory nor a git revision of {ROOT}; "
                         "give a commit (e.g. main, f86fd70) or an existing checkout's directory")
    sha = got.stdout.strip()
    dest = work / f"src-{sha}"
    # one process per side (--sides base, --sides head) may start together: one checks out at a time
    with open(work / ".checkout.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not dest.exists():
            # a checkout removed by hand (rm -rf of --work) is still registered: forget it first
            subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)
            made = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(dest), sha],
                                  capture_output=True, text=True)
            if made.returncode:
                raise SystemExit(f"desim: error: --work {work}: cannot check out {sha} there "
                                 f"({made.stderr.strip().splitlines()[-1] if made.stderr.strip() else 'git failed'})")
    return dest


def _done(out: Path) -> bool:
    return out.is_dir() and any(p.suffix in (".csv", ".json") for p in out.iterdir())


def _takes_store(script: Path) -> bool:
    """Does the experiment take ``--store`` at its revision (its ``--help`` says)?"""
    got = subprocess.run([sys.executable, str(script), "--help"], cwd=str(script.parents[1]), capture_output=True,
                         text=True, env=side_env(script.parents[1], "reference"))
    return "--store" in got.stdout


def side_env(src: Path, engine: str) -> dict[str, str]:
    """The environment a side's runs get: its checkout first on ``PYTHONPATH``, the engine, fixed hashing."""
    path = os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, DESIM_ENGINE=engine, PYTHONHASHSEED="0", MPLBACKEND="Agg")


def side_fingerprint(src: Path) -> str:
    """The ``model_fingerprint`` of the ``desim`` a side imports; an error unless it is the checkout's own."""
    got = subprocess.run([sys.executable, "-c", "import desim; print(desim.__file__); print(desim.model_fingerprint())"],
                         cwd=str(src), env=side_env(src, "reference"), capture_output=True, text=True)
    lines = got.stdout.splitlines()
    if got.returncode or len(lines) != 2:
        raise SystemExit(f"desim: error: {src}: 'import desim' fails there ({got.stderr.strip()[-300:]})")
    where = Path(lines[0]).resolve()
    if not where.is_relative_to(src.resolve()):
        raise SystemExit(f"desim: error: {src}: 'import desim' loads {where}, not the checkout's own package; "
                         "remove PYTHONPATH entries or .pth files that put another desim first")
    return lines[1]


def recorded_versions(out: Path) -> set[str]:
    """Every ``model_version`` the outputs in ``out`` record (JSON values and CSV columns)."""
    found: set[str] = set()

    def walk(obj) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k == "model_version" and isinstance(v, str):
                    found.add(v)
                else:
                    walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    for p in out.rglob("*"):
        if p.suffix == ".json":
            walk(json.loads(p.read_text()))
        elif p.suffix == ".csv":
            with open(p, newline="") as f:
                found.update(r["model_version"] for r in csv.DictReader(f) if r.get("model_version"))
    return found


def run_one(src: Path, name: str, mode: str, out: Path, engine: str, log,
            store: Path | None = None) -> tuple[int, float]:
    args = [sys.executable, str(src / "experiments" / f"{name}.py"), "--out", str(out)]
    if mode == "quick":
        args.append("--quick")
    if store is not None and _takes_store(src / "experiments" / f"{name}.py"):
        args += ["--store", str(store)]
    env = side_env(src, engine)
    t0 = time.perf_counter()
    r = subprocess.run(args, cwd=str(src), env=env, stdout=log, stderr=subprocess.STDOUT)
    return r.returncode, time.perf_counter() - t0


def run_record_path(out: Path) -> Path:
    """Where the tool notes what made ``out`` (beside it, so the diff of the outputs never sees it)."""
    return out.with_name(out.name + ".run.json")


def write_run_record(out: Path, fingerprint: str, engine: str, code: int, wall_s: float) -> dict:
    """Note which code and engine made ``out``: a later ``--reuse`` checks it, also for experiments whose
    outputs record no ``model_version`` (``recorded_time_map``, and ``seed_claims`` before ``711d240``)."""
    rec = {"model_version": fingerprint, "engine": engine, "exit": code, "wall_s": round(wall_s, 1)}
    run_record_path(out).write_text(json.dumps(rec) + "\n")
    return rec


def read_run_record(out: Path) -> dict:
    """The record of the run that made ``out``; empty for outputs made before the tool kept records."""
    p = run_record_path(out)
    return json.loads(p.read_text()) if p.exists() else {}


def _strip(obj, path: str = ""):
    if isinstance(obj, dict):
        return {k: _strip(v, f"{path}.{k}") for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [_strip(v, path) for v in obj]
    return obj


def _diff_json(a, b, path: str, out: list[str]) -> None:
    if type(a) is not type(b):
        out.append(f"{path}: {a!r} != {b!r}")
    elif isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'head' if k in b else 'base'}")
            else:
                _diff_json(a[k], b[k], f"{path}.{k}", out)
    elif isinstance(a, list):
        if len(a) != len(b):
            out.append(f"{path}: {len(a)} items != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _diff_json(x, y, f"{path}[{i}]", out)
    elif a != b and not (a != a and b != b):  # NaN == NaN here
        out.append(f"{path}: {a!r} != {b!r}")


def _diff_csv(pa: Path, pb: Path, out: list[str]) -> None:
    with open(pa, newline="") as fa, open(pb, newline="") as fb:
        ra, rb = list(csv.reader(fa)), list(csv.reader(fb))
    if not ra or not rb:
        if ra != rb:
            out.append(f"{pa.name}: one side empty")
        return
    ha, hb = ra[0], rb[0]
    keep = [c for c in ha if c not in VOLATILE_KEYS]
    if [c for c in hb if c not in VOLATILE_KEYS] != keep:
        out.append(f"{pa.name}: columns differ: {sorted(set(ha) ^ set(hb))}")
        return
    ia, ib = [ha.index(c) for c in keep], [hb.index(c) for c in keep]
    if len(ra) != len(rb):
        out.append(f"{pa.name}: {len(ra) - 1} rows != {len(rb) - 1}")
    for n, (x, y) in enumerate(zip(ra[1:], rb[1:]), start=1):
        for c, i, j in zip(keep, ia, ib):
            if x[i] != y[j]:
                out.append(f"{pa.name} row {n} {c}: {x[i]} != {y[j]}")


def diff_dirs(a: Path, b: Path) -> tuple[int, list[str]]:
    """(files compared, differences) between two output directories (JSON and CSV files)."""
    diffs: list[str] = []
    names = sorted({p.relative_to(a) for p in a.rglob("*") if p.suffix in (".json", ".csv")}
                   | {p.relative_to(b) for p in b.rglob("*") if p.suffix in (".json", ".csv")})
    for rel in names:
        pa, pb = a / rel, b / rel
        if not pa.exists() or not pb.exists():
            diffs.append(f"{rel}: only in {'head' if pb.exists() else 'base'}")
        elif rel.suffix == ".json":
            _diff_json(_strip(json.loads(pa.read_text())), _strip(json.loads(pb.read_text())), str(rel), diffs)
        else:
            _diff_csv(pa, pb, diffs)
    return len(names), diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="bcc7ca2", help="git revision (or directory) before (default bcc7ca2)")
    ap.add_argument("--head", default=str(ROOT), help="git revision or directory after (default: this checkout)")
    ap.add_argument("--modes", default="quick,default", help="quick, default or both (comma-separated)")
    ap.add_argument("--only", default=None, help="experiments to run (default: every shipped one)")
    ap.add_argument("--kvm", action="store_true", help="also run kvm_crossover (real KVM: differs by nature)")
    ap.add_argument("--engine", default="reference", choices=["reference", "fast"])
    ap.add_argument("--work", default="/tmp/desim-compare", help="worktrees, outputs and logs")
    ap.add_argument("--reuse", action="store_true", help="keep outputs already in --work (resume)")
    ap.add_argument("--store", action="store_true", help="keep each run's replications in a store under --work "
                    "(a stopped run resumes with --reuse)")
    ap.add_argument("--sides", default="base,head", help="run only these sides now (base, head); the table "
                    "needs both (run the other later with --reuse)")
    a = ap.parse_args(argv)
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    names = a.only.split(",") if a.only else [n for n in EXPERIMENTS if a.kvm or n not in NEEDS_KVM]
    unknown = [n for n in names if n not in EXPERIMENTS]
    modes = a.modes.split(",")
    if unknown or any(m not in ("quick", "default") for m in modes):
        print(f"desim: error: --only/--modes: unknown {unknown or modes}; use {','.join(EXPERIMENTS)} and "
              "quick,default", file=sys.stderr)
        return 2
    srcs = {"base": checkout(a.base, work), "head": checkout(a.head, work)}
    prints = {side: side_fingerprint(src) for side, src in srcs.items()}
    rows = []
    for name in names:
        for mode in modes:
            res, ran = {}, {}
            for side, src in srcs.items():
                out = work / side / f"{name}-{mode}"
                if side not in a.sides.split(",") or (a.reuse and _done(out)):
                    ran[side] = read_run_record(out)  # an earlier run's: its code is checked below
                    res[side] = (ran[side].get("exit", 0), ran[side].get("wall_s", float("nan")))
                    continue
                with open(work / f"{side}-{name}-{mode}.log", "w") as log:
                    res[side] = run_one(src, name, mode, out, a.engine, log,
                                        work / f"store-{side}-{name}-{mode}" if a.store else None)
                ran[side] = write_run_record(out, prints[side], a.engine, *res[side])
                print(f"{side} {name} {mode}: exit {res[side][0]} in {res[side][1]:.0f} s", file=sys.stderr)
            if not all(_done(work / side / f"{name}-{mode}") for side in srcs):
                rows.append((name, mode, 0, "not run on both sides yet", res))
                continue
            if res["base"][0] or res["head"][0]:
                rows.append((name, mode, 0, f"FAILED (exit base {res['base'][0]}, head {res['head'][0]}; logs in "
                             f"{work})", res))
                continue
            other = [f"{side} ran with DESIM_ENGINE={r['engine']}" for side, r in ran.items()
                     if r.get("engine", a.engine) != a.engine]
            if other:
                rows.append((name, mode, 0, "WRONG ENGINE: " + "; ".join(other) + f", not {a.engine}; delete "
                             f"them under {work} and run again", res))
                continue
            wrong = {side: sorted((recorded_versions(work / side / f"{name}-{mode}")
                                   | ({ran[side]["model_version"]} if "model_version" in ran[side] else set()))
                                  - {prints[side]})
                     for side in srcs}
            if any(wrong.values()):
                rows.append((name, mode, 0, "WRONG CODE: outputs or run record name model_version " + "; ".join(
                    f"{side} {v} (its checkout is {prints[side]})" for side, v in wrong.items() if v)
                    + f"; delete them under {work} and run again", res))
                continue
            n, diffs = diff_dirs(work / "base" / f"{name}-{mode}", work / "head" / f"{name}-{mode}")
            verdict = "identical" if not diffs else f"DIFFERENT ({len(diffs)}): " + "; ".join(diffs[:3])
            rows.append((name, mode, n, verdict, res))
    print(f"\nbase {a.base} ({srcs['base']}, model {prints['base']}) vs head {a.head} ({srcs['head']}, model "
          f"{prints['head']}), DESIM_ENGINE={a.engine}\n")
    print("| experiment | mode | files | wall s base / head | result |\n|---|---|---|---|---|")
    for name, mode, n, verdict, res in rows:
        wall = " / ".join("?" if res[side][1] != res[side][1] else f"{res[side][1]:.0f}" for side in ("base", "head"))
        print(f"| {name} | {mode} | {n} | {wall} | {verdict} |")
    return 0 if all(r[3] == "identical" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
