"""How much do the recorded boots' results depend on how recorded time becomes simulated time?

A recording is made under QEMU TCG with a plugin, which runs guest instructions tens of times slower
than a KVM vCPU while timers and halts keep wall-clock time (see ``desim/replay.py``). The boot
workloads map a vCPU's busy time to ``instructions x ns_per_insn`` (``time_map = "instructions"``,
0.5 ns: an estimate, ~1 instruction per cycle at 2 GHz) and keep the time in which every vCPU was
halted. This script reruns the seed's claims with other choices:

* ``instructions`` with ``ns_per_insn`` 0.25, 0.5, 1 and 2 (IPC 2 at 2 GHz to IPC 0.5 at 1 GHz);
* ``recorded``: the TCG wall-clock timeline itself (``time_scale`` 1) and ten times faster (0.1).

and prints, per choice, the targeted-vs-fast change of EPT violations and of boot time with CIs over
the recorded boots, and the simulated boot time. Fault counts barely move (which pages are touched
again after a zap is fixed by the recording, not by time); boot time and its change do, because the
shorter the guest's busy time, the larger the share of fault handling in it.

    python experiments/recorded_time_map.py [--quick] [--replications N] [--workers W] [--out DIR] [--store DIR]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from desim import experiment as ex  # noqa: E402
from desim.stats import ratio_ci  # noqa: E402
from desim.studies.cluster import open_backend  # noqa: E402
from desim.studies import toolkit as C  # noqa: E402

BOOT = ROOT / "workloads" / "boot"
CHOICES = [  # (label, overrides of every recorded phase)
    ("instructions 0.25 ns", {"time_map": "instructions", "ns_per_insn": 0.25}),
    ("instructions 0.5 ns (default)", {"time_map": "instructions", "ns_per_insn": 0.5}),
    ("instructions 1 ns", {"time_map": "instructions", "ns_per_insn": 1.0}),
    ("instructions 2 ns", {"time_map": "instructions", "ns_per_insn": 2.0}),
    ("recorded x 1 (TCG wall clock)", {"time_map": "recorded", "time_scale": 1.0}),
    ("recorded x 0.1", {"time_map": "recorded", "time_scale": 0.1}),
]
CASES = [("boot-6g.toml", "thp"), ("boot-6g.toml", "4k"), ("boot-32g-churn.toml", "thp")]


def change(runs: pd.DataFrame, metric: str) -> str:
    a = runs[runs.policy == "fast"].set_index("replication")[metric]
    b = runs[runs.policy == "targeted"].set_index("replication")[metric]
    iv = ratio_ci(a.to_numpy(float), b.loc[a.index].to_numpy(float), 0.95, method="delta")
    return f"{iv.estimate - 1:+.1%} [{iv.low - 1:+.1%}, {iv.high - 1:+.1%}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Sensitivity of the recorded boots to the time mapping.")
    ap.add_argument("--quick", action="store_true", help="boot-6g with THP, two choices, one replication")
    ap.add_argument("--replications", "-n", type=int, default=None, help="default 3 (one per recorded boot)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", default="legacy-2020")
    ap.add_argument("--out", default=str(ROOT / "results" / "recorded_time_map"))
    C.add_run_options(ap)  # --workers --scheduler --progress --store, as in every experiment script
    args = C.parse_args(ap, argv)  # --out and --store checked before any run, as desim does
    n = args.replications or (1 if args.quick else 3)
    cases = CASES[:1] if args.quick else CASES
    choices = [CHOICES[1], CHOICES[4]] if args.quick else CHOICES
    t0 = time.perf_counter()
    rows, all_runs = [], []
    with open_backend(args.backend) as be:  # one cluster (with --workers) for every run, not one per call
        for wl, backing in cases:
            base = ex.load(BOOT / wl)
            recorded = [i for i, ph in enumerate(base.phases) if ph.pattern == "recorded"]
            for label, ov in choices:
                over = {"profile": args.profile, "profile_overrides.kernel.backing": backing}
                for i in recorded:
                    over.update({f"phases.{i}.{k}": v for k, v in ov.items()})
                sc = base.with_overrides(over)
                print(f"{wl} ({backing}), {label} ...", file=sys.stderr)
                runs = ex.replicate(sc, ["fast", "targeted"], n, args.seed, be, store=args.store,
                                    progress=args.progress)
                runs.insert(0, "workload", wl.removesuffix(".toml"))
                runs.insert(1, "backing", backing)
                runs.insert(2, "time_map", label)
                all_runs.append(runs)
                fast = runs[runs.policy == "fast"]
                targeted = runs[runs.policy == "targeted"]
                rows.append({"workload": wl.removesuffix(".toml"), "backing": backing, "time_map": label,
                             "faults_change": change(runs, "faults") if n > 1 else
                             f"{targeted.faults.mean() / fast.faults.mean() - 1:+.1%}",
                             "boot_time_change": change(runs, "completion_ns") if n > 1 else
                             f"{targeted.completion_ns.mean() / fast.completion_ns.mean() - 1:+.2%}",
                             "fast_boot_s": fast.completion_ns.mean() / 1e9,
                             "fast_linux_s": (fast.completion_ns - fast.phase_firmware_ns).mean() / 1e9,
                             "fast_faults": fast.faults.mean()})
    table = pd.DataFrame(rows)
    print(f"\nTargeted vs fast zap under different time mappings ({args.profile}, {n} replications, "
          f"{time.perf_counter() - t0:.0f} s)")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda x: f"{x:,.3f}"))
    out = ex.write_outputs(args.out, {"runs.csv": ex.csv_writer(pd.concat(all_runs, ignore_index=True)),
                                      "time_map.csv": ex.csv_writer(table)})
    print(f"\nwrote runs.csv, time_map.csv to {out}")
    return 0


if __name__ == "__main__":
    C.guarded_main(main)
