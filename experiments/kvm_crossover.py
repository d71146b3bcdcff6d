"""On this host's real KVM: from which size of a deleted, untouched memslot does the targeted zap cost
more than the fast zap, and does the simulator predict that size?

The targeted zap (``KVM_X86_QUIRK_SLOT_ZAP_ALL`` disabled; the seed's
``KVM_ZAP_ONLY_MEMSLOT_SPTES``) walks the deleted slot gfn by gfn under
``mmu_lock`` (shadow MMU: an rmap probe per gfn and level in
``kvm_unmap_gfn_range``, a ``mmu_page_hash`` probe per gfn in
``kvm_mmu_zap_memslot_pages_and_flush``), so its cost grows with the slot even
when the guest never touched it. The fast zap (``kvm_mmu_zap_all_fast``)
costs the same whatever slot goes, but afterwards the guest faults again on
every page it uses. So a VM with a small working set and a large idle slot
(a big BAR, a hot-unplugged DIMM, a virtio-mem region) is better off with the
fast zap: this script finds the break-even slot size on the real KVM and in the
simulator, for a few working-set sizes.

Each point is a :class:`desim.kvm.scenario.KvmScenario`: ``--ram-mib`` of RAM
touched by one vCPU (every page, so its SPTEs exist), one extra slot of
``--slot-mib`` outside the touched range that is deleted (``op = "delete"``),
then the RAM touched again. The cost of a policy is the DELETE ioctl plus the
extra time of the re-touch pass over a steady-state pass (the re-faults'
price). Real runs: :func:`desim.kvm.measure.measure_interleaved` (median and
min-max of ``--repeats``); simulated: :func:`desim.kvm.simbridge.sim_metrics`
on ``--profile`` (default ``shadow-pvm``, calibrated on these machines), with
the guest's access time per page taken from the real steady-state pass. The
break-even size is interpolated linearly in log2(slot size) between the two
measured sizes where targeted minus fast changes sign.

Options common to every experiment script: ``--store DIR`` keeps every real
run (keyed by this host, the point, the policy and the repeat), so a re-run
measures only the points it lacks; ``--workers``/``--scheduler`` run the
simulated predictions on a Dask cluster (the real runs always run here, one at
a time: they time this host's KVM).

Outputs in ``--out`` (written atomically): ``runs.csv`` (every real run),
``summary.csv`` (real median/min/max and simulated value per point, policy and
metric), ``crossover.csv`` (real and predicted break-even size per RAM size),
``summary.json`` and ``kvm_crossover.png``/``.svg``. Needs ``/dev/kvm`` with
Linux 6.12+ (exit 2 with one line otherwise).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from typing import Any

import pandas as pd

from desim.studies.toolkit import (POLICY_COLORS, add_run_options, clean_json, figure_writers,  # noqa: E402
                                   guarded_main, plt_module, write_all)

from desim.errors import DesimInputError  # noqa: E402
from desim.outputs import check_output_dir  # noqa: E402
from desim.kvm.measure import measure_interleaved  # noqa: E402
from desim.kvm.scenario import KvmScenario, layout  # noqa: E402
from desim.kvm.simbridge import sim_metrics  # noqa: E402
from desim.kvm.vm import KvmError  # noqa: E402
from desim.profile import load_profile  # noqa: E402
from desim.studies.store import ResultStore  # noqa: E402

NAME = "kvm_crossover"
POLICIES = ("fast", "targeted")
METRICS = ("zap_ioctl_ns", "retouch_extra_ns", "cost_ns", "refaults")


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise DesimInputError(f"{what} {text!r}: expected comma-separated whole numbers of MiB") from None
    if not vals or any(v < 2 or v % 2 for v in vals):
        raise DesimInputError(f"{what} {text!r}: every size must be an even number of MiB >= 2")
    return sorted(set(vals))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke version (64 MiB, two slot sizes)")
    ap.add_argument("--out", default=f"results/{NAME}", help=f"output directory (default results/{NAME})")
    ap.add_argument("--ram-mib", default=None, help="working-set sizes in MiB, comma-separated (default 64,128)")
    ap.add_argument("--slot-mib", default=None,
                    help="deleted slot sizes in MiB, comma-separated (default 512,1024,2048,4096,8192)")
    ap.add_argument("--repeats", type=int, default=None, help="real runs per point and policy (default 3; quick 1)")
    ap.add_argument("--profile", default="shadow-pvm", help="host profile of the simulated side (name or TOML)")
    add_run_options(ap)
    a = ap.parse_args(argv)
    from desim.studies.cluster import BackendSpec

    a.backend = BackendSpec(workers=a.workers, scheduler=a.scheduler)
    a.backend.check()
    a.ram = _int_list(a.ram_mib or ("64" if a.quick else "64,128"), "--ram-mib")
    a.slots = _int_list(a.slot_mib or ("1024,4096" if a.quick else "512,1024,2048,4096,8192"), "--slot-mib")
    a.repeats = a.repeats if a.repeats is not None else (1 if a.quick else 3)
    if a.repeats < 1:
        raise DesimInputError(f"--repeats must be >= 1 (got {a.repeats})")
    load_profile(a.profile)  # a bad name or file fails before any VM runs
    check_output_dir(a.out, "--out")  # so does an output directory that cannot be written
    if a.store is not None:
        check_output_dir(a.store, "--store")
    return a


def _run_key(sc: KvmScenario, repeats: int, policy: str, repeat: int) -> str:
    """A real run is this host's (kernel, machine), this point, policy and repeat, under this desim."""
    import hashlib
    import platform

    from desim import model_fingerprint

    blob = json.dumps([NAME, platform.node(), platform.release(), platform.machine(), model_fingerprint(),
                       sc.name, sc.ram_mib, sc.extra_slot_mib, sc.op, repeats, policy, repeat])
    return hashlib.sha256(blob.encode()).hexdigest()


def _stored_runs(store: ResultStore, sc: KvmScenario, repeats: int) -> list[dict[str, Any]] | None:
    """Every real run of a point from the store, or None if any is missing (then the point runs again)."""
    want = [(pol, rep) for rep in range(repeats) for pol in POLICIES]
    keys = [_run_key(sc, repeats, pol, rep) for pol, rep in want]
    found = store.get_many(keys, [{"policy": pol, "seed": 0, "replication": rep} for pol, rep in want])
    if len(found) < len(keys):
        return None
    return [{"policy": pol, "repeat": rep, "vm": 0, "metrics": found[k]["metrics"]} for (pol, rep), k in zip(want, keys)]


def _store_runs(store: ResultStore, sc: KvmScenario, repeats: int, runs: list[dict[str, Any]]) -> None:
    store.put_many([(_run_key(sc, repeats, r["policy"], r["repeat"]),
                     {"scenario": f"{NAME}/{sc.name}", "policy": r["policy"], "seed": 0, "replication": r["repeat"],
                      "metrics": {k: v for k, v in r["metrics"].items() if isinstance(v, (int, float))}})
                    for r in runs])


def crossover(sizes: list[int], fast: list[float], targeted: list[float]) -> float | None:
    """The slot size where ``targeted - fast`` turns positive (log2-linear interpolation);
    ``None`` if it never does, ``0.0`` if the targeted zap costs more already at the smallest size."""
    d = [t - f for f, t in zip(fast, targeted)]
    if d and d[0] > 0:
        return 0.0
    for i in range(1, len(d)):
        if d[i - 1] <= 0 < d[i]:
            x0, x1 = math.log2(sizes[i - 1]), math.log2(sizes[i])
            return 2 ** (x0 + (x1 - x0) * (-d[i - 1]) / (d[i] - d[i - 1]))
    return None


def main() -> int:
    args = parse()
    points = [KvmScenario(name=f"ram{r}-slot{s}", ram_mib=r, extra_slot_mib=s, op="delete")
              for r in args.ram for s in args.slots]
    print(f"{len(points)} point(s) x 2 policies x {args.repeats} real run(s) on /dev/kvm ...", file=sys.stderr)
    store = ResultStore(args.store) if args.store else None
    stored = {i: _stored_runs(store, sc, args.repeats) for i, sc in enumerate(points)} if store else {}
    todo = [i for i in range(len(points)) if stored.get(i) is None]
    if len(todo) < len(points):
        print(f"{len(points) - len(todo)} point(s) found in the store {store.path}", file=sys.stderr)
    try:
        fresh = measure_interleaved([points[i] for i in todo], args.repeats,
                                    progress=lambda m: print(m, file=sys.stderr, flush=True)) if todo else []
    except KvmError as e:
        print(f"error: KVM failed: {e}", file=sys.stderr)
        return 1
    for i, m in zip(todo, fresh):
        if store is not None:
            _store_runs(store, points[i], args.repeats, m.runs)
        stored[i] = m.runs
    measured = [stored[i] for i in range(len(points))]
    # the simulated side needs each point's real access time: one simulator run per point and policy
    sim_jobs = []
    for sc, m in zip(points, measured):
        pages = layout(sc).touched_pages(4096)
        for pol in POLICIES:
            access = statistics.median(r["metrics"]["warm_ns"] for r in m if r["policy"] == pol) / pages
            sim_jobs.append((sc.with_policy(pol), args.profile, 1, 0, access))
    from desim.studies.cluster import open_backend

    with open_backend(args.backend) as be:
        sims = iter(be.map_calls(sim_metrics, sim_jobs))
    runs, summary = [], []
    for sc, m in zip(points, measured):
        for pol in POLICIES:
            for r in m:
                if r["policy"] == pol:
                    x = r["metrics"]
                    runs.append({"ram_mib": sc.ram_mib, "slot_mib": sc.extra_slot_mib, "policy": pol,
                                 "repeat": r["repeat"], **{k: x[k] for k in METRICS if k in x},
                                 "cost_ns": x["zap_ioctl_ns"] + x["retouch_extra_ns"]})
            real = [row for row in runs if row["ram_mib"] == sc.ram_mib and row["slot_mib"] == sc.extra_slot_mib
                    and row["policy"] == pol]
            sim = next(sims)
            sim["cost_ns"] = sim["zap_ioctl_ns"] + sim["retouch_extra_ns"]
            for k in METRICS:
                xs = [row[k] for row in real]
                summary.append({"ram_mib": sc.ram_mib, "slot_mib": sc.extra_slot_mib, "policy": pol, "metric": k,
                                "real_median": statistics.median(xs), "real_min": min(xs), "real_max": max(xs),
                                "sim": sim[k]})
    runs_df, sum_df = pd.DataFrame(runs), pd.DataFrame(summary)
    cross = []
    for r in args.ram:
        c = sum_df[(sum_df.ram_mib == r) & (sum_df.metric == "cost_ns")]
        get = lambda pol, col: [float(c[(c.policy == pol) & (c.slot_mib == s)][col].iloc[0])  # noqa: E731
                                for s in args.slots]
        cross.append({"ram_mib": r,
                      "real_crossover_mib": crossover(args.slots, get("fast", "real_median"),
                                                      get("targeted", "real_median")),
                      "sim_crossover_mib": crossover(args.slots, get("fast", "sim"), get("targeted", "sim"))})
    cross_df = pd.DataFrame(cross)

    def label(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return f"> {args.slots[-1]} MiB"
        return f"< {args.slots[0]} MiB" if v == 0 else f"{v:.0f} MiB"

    print(f"\nCost of deleting an untouched slot (DELETE ioctl + re-fault time), real median vs simulated "
          f"({args.profile}):")
    c = sum_df[sum_df.metric == "cost_ns"]
    for r in args.ram:
        for s in args.slots:
            cells = []
            for pol in POLICIES:
                row = c[(c.ram_mib == r) & (c.slot_mib == s) & (c.policy == pol)].iloc[0]
                cells.append(f"{pol} {row.real_median / 1e6:7.2f} ms (sim {row.sim / 1e6:7.2f})")
            print(f"  RAM {r:5d} MiB, slot {s:6d} MiB:  " + "   ".join(cells))
    for row in cross:
        print(f"  RAM {row['ram_mib']} MiB: the targeted zap costs more from a slot of "
              f"{label(row['real_crossover_mib'])} (real) / {label(row['sim_crossover_mib'])} (simulated)")

    plt = plt_module()
    fig, axes = plt.subplots(1, len(args.ram), figsize=(max(7.0, 5.5 * len(args.ram)), 4.6), squeeze=False,
                             layout="constrained")
    for ax, r in zip(axes[0], args.ram):
        for pol in POLICIES:
            d = c[(c.ram_mib == r) & (c.policy == pol)].sort_values("slot_mib")
            x = d.slot_mib.to_numpy() / 1024
            ax.errorbar(x, d.real_median / 1e6, yerr=[(d.real_median - d.real_min) / 1e6, (d.real_max - d.real_median) / 1e6],
                        fmt="o", color=POLICY_COLORS[pol], capsize=3, label=f"{pol}: real KVM")
            ax.plot(x, d.sim / 1e6, "--", color=POLICY_COLORS[pol], label=f"{pol}: simulated")
        ax.set_xscale("log", base=2)
        ticks = [v / 1024 for v in args.slots]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("deleted (untouched) slot, GiB")
        ax.set_ylabel("DELETE ioctl + re-fault time (ms)")
        ax.set_title(f"{r} MiB touched by the guest")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    # two lines in a constrained layout: one panel is narrower than the title, which was clipped
    fig.suptitle("When does the targeted zap cost more than the fast zap?\n"
                 f"this host's KVM (median, min-max of {args.repeats}) vs desim ({args.profile})", fontsize=11)
    meta = {"experiment": NAME, "args": {k: v for k, v in vars(args).items() if k != "backend"},
            "crossover": clean_json(cross), "profile": args.profile}
    files = {"runs.csv": lambda p: runs_df.to_csv(p, index=False),
             "summary.csv": lambda p: sum_df.to_csv(p, index=False),
             "crossover.csv": lambda p: cross_df.to_csv(p, index=False),
             "summary.json": lambda p: p.write_text(json.dumps(clean_json(meta), indent=1) + "\n"),
             **figure_writers(fig, NAME)}
    out = write_all(args.out, files)
    print(f"\nwrote {', '.join(files)} to {out}")
    return 0


if __name__ == "__main__":
    guarded_main(main)
