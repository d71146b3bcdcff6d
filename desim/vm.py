"""A VM wired together from a scenario: mmu, ``mmu_lock``, vCPUs, the VMM, the policy, metrics.

``run_scenario(scenario, policy, seed, replication)`` is the one entry point
that everything else (CLI, comparisons, sweeps, experiments) calls. Phases run
one after another: a phase starts its vCPUs' access streams (the others stay
HALTED) and its VMM script, and ends when both are done; the end of the last
phase is the workload's completion time ("boot time" for a boot workload).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator

import numpy as np
import simpy

from . import model_fingerprint
from .audit import Audit
from .cohort import Cohort
from .costs import CostSampler
from .engine import FastEnvironment, make_environment
from .errors import DesimInputError
from .guest_as import GuestAddressSpaces
from .hostmm import LRU_BATCH_NEW, LRU_BATCH_OLD, LRU_BATCH_SINCE, HostMm
from .limits import check_memory
from .lock import MmuLock
from .memslot import Memslot, MemslotOp
from .metrics import Metrics
from .mmu import Mmu
from .nx import ExecRanges, nx_huge_page_recovery_worker
from .profile import HostProfile
from .sched import NeedResched
from .scenario import PhaseSpec, Scenario, TouchSpec, phase_ops
from .streams import stream
from .vcpu import Vcpu
from .vmm import Vmm
from .workload import AccessStream, ChainedStream, RepeatingStream, make_stream, perf_streams, split_region
from .zap import make_policy


@dataclass(frozen=True)
class RunStatus:
    """Where a run is: simulated time, phase, an estimate of the fraction done, faults so far
    (what :meth:`Vm.run` reports at checkpoints; :mod:`desim.progress` shows it)."""

    sim_ns: float
    phase: str
    phase_index: int
    phases: int
    fraction: float
    faults: int


class Vm:
    """One simulated VM."""

    def __init__(self, scenario: Scenario, policy: str, seed: int = 0, replication: int = 0,
                 profile: HostProfile | None = None, audit: bool = False, engine: str | None = None) -> None:
        check_memory(scenario)  # before any allocation: refuse with the amount needed (desim.limits)
        self.scenario = scenario
        self.seed = seed
        self.replication = replication
        # the event loop (desim.engine): both engines run this same model and give identical results
        self.env = make_environment(engine)
        self.profile = profile or scenario.host_profile()
        k = self.profile.kernel
        # every cost is read through the sampler: the VMM's view here, each vCPU its own (desim.costs)
        self.costs = CostSampler(self.profile, scenario.costs, seed, replication)
        self.P = self.costs.view("vmm")
        self.policy_name = policy
        self.policy = make_policy(policy)
        self.metrics = Metrics(scenario.vm.vcpus)
        # the hits' latency shape, read by the statistics only (desim/hitdist.py); none with costs = "mean"
        self.metrics.hit_dist = scenario.access_dist if scenario.costs == "sampled" else None
        self.lock = MmuLock(self.env, kind=k.lock, preemption=k.needbreak_on_contention,
                            handoff_ns=self.costs.mean("lock_handoff"))
        self.need_resched = NeedResched.from_kernel(k)
        mean = self.costs.mean  # per-page constants of the host-mm queues (PER_UNIT_COSTS: never drawn)
        self.hostmm = HostMm(mean("zone_lock_page"), mean("lru_lock_page"), mean("clear_page_4k"), mean("membw_4k"),
                             lru_batch=LRU_BATCH_NEW if k.version_tuple >= LRU_BATCH_SINCE else LRU_BATCH_OLD)
        self.fault_lock_mode = k.fault_lock
        self.mmu = Mmu(backing=k.backing, thp_fraction=k.thp_fraction,
                       nx_exec=ExecRanges() if k.nx_huge_pages else None)
        g = scenario.guest
        # shadow paging only: guest processes (roots per CR3, prev_roots) and page-table writes (desim/guest_as.py)
        self.guest = GuestAddressSpaces(g.processes, g.context_switch_us * 1e3, g.pt_write_share,
                                        None if g.pgd_gpa is None else g.pgd_gpa >> 12, k.root_level,
                                        g.process_pages, 0 if g.process_gpa is None else g.process_gpa >> 12,
                                        g.user_share) \
            if k.mmu == "shadow" and (g.processes > 1 or g.pt_write_share > 0 or g.user_share > 0) else None
        self.audit = Audit(self) if audit else None
        self._next_ua = 0x7F0000000000
        self._ua_by_slot: dict[int, int] = {}
        for s in scenario.vm.memslots:
            ss = self.mmu.add_slot(Memslot(s.id, s.gpa >> 12, s.size >> 12, s.flags,
                                           s.ua or self._fresh_ua(s.id, s.size)))
            if s.backing is not None:
                ss.block.backing = s.backing
            if s.prealloc:
                ss.block.prealloc()
        self.vmm = Vmm(self)
        # the fast engine takes many vCPUs' steps in one loop (desim/cohort.py)
        self.cohort = (Cohort(self) if isinstance(self.env, FastEnvironment) and self.audit is None
                       and self.guest is None and scenario.vm.vcpus > 1 else None)
        self.vcpus = [Vcpu(self, i) for i in range(scenario.vm.vcpus)]
        self._slot_update: simpy.Event | None = None
        self._vmm_running = False
        self.checkpoints = None  # the progress checkpoints' process (Vm.run)
        # where the run is, for progress reports only (never read by the model)
        self._phase_index = 0
        self._phase_planned: int | None = 0  # accesses the phase's streams will make (None: open-ended)
        self._phase_accesses0 = 0
        self._phase_ops = (0, 0)  # (ioctls recorded before the phase, ops in the phase's script)

    # -- host virtual addresses for slots that do not give one ------------------
    def _fresh_ua(self, slot_id: int, size: int) -> int:
        """A 1 GiB-aligned hva range per slot id, reused when the slot id is re-created."""
        ua = self._ua_by_slot.get(slot_id)
        if ua is None:
            ua = self._next_ua
            self._next_ua += -(-size // (1 << 30)) * (1 << 30) + (1 << 30)
            self._ua_by_slot[slot_id] = ua
        return ua

    def default_ua(self, op: MemslotOp) -> int:
        return self._fresh_ua(op.slot, op.size)

    # -- RET_PF_RETRY waiters ---------------------------------------------------------
    def slot_update_done(self) -> simpy.Event:
        """An event that fires when the memslot update in flight has finished."""
        if self._slot_update is None:
            self._slot_update = self.env.event()
        return self._slot_update

    def memslot_update_finished(self) -> None:
        if self._slot_update is not None:
            ev, self._slot_update = self._slot_update, None
            ev.succeed()

    # -- phases ---------------------------------------------------------------------
    def _touch_vcpus(self, which: int | str) -> list[Vcpu]:
        n = len(self.vcpus)
        if which == "all":
            return list(self.vcpus)
        if which == "bsp":
            return self.vcpus[:1]
        if which == "aps":
            return self.vcpus[1:]
        if which > n:
            raise DesimInputError(f"vcpus = {which} but the VM has {n}")
        return self.vcpus[:which]

    def _touch_region(self, phase: PhaseSpec, touch: TouchSpec) -> tuple[int, int]:
        """(first gfn, pages) of a touch's region, resolved now."""
        if touch.gpa is not None:
            return touch.gpa >> 12, touch.size >> 12
        ss = self.mmu.slots.get(touch.slot)
        if ss is None:
            raise DesimInputError(f"phase {phase.name}: memslot {touch.slot} does not exist when the phase starts")
        lo = ss.slot.base_gfn + (touch.offset >> 12)
        n = (touch.size >> 12) if touch.size is not None else ss.slot.npages - (touch.offset >> 12)
        if n <= 0 or lo + n > ss.slot.end_gfn:
            raise DesimInputError(f"phase {phase.name}: offset/size fall outside memslot {touch.slot}")
        return lo, n

    def _start_streams(self, phase: PhaseSpec, on_done) -> int:
        """Build every vCPU's stream for the phase (its touches in order) and wake the vCPUs."""
        per_vcpu: dict[int, list[AccessStream]] = {}
        planned: int | None = 0
        for ti, touch in enumerate(phase.touch_list()):
            active = self._touch_vcpus(touch.vcpus)
            if touch.pattern == "recorded":
                from .replay import Replay

                for idx, st in Replay(self, touch, phase.name).streams([v.index for v in active]).items():
                    planned = None if planned is None else planned + st.total
                    per_vcpu.setdefault(idx, []).append(st)
                continue
            if touch.pattern == "trace":
                streams = perf_streams(touch.perf_trace, len(active))
                for v, gfns in zip(active, streams):
                    planned = None if planned is None else planned + len(gfns)
                    st = make_stream("gfns", 0, 0, rng=None, gfns=gfns)
                    st.access_ns = touch.access_ns
                    per_vcpu.setdefault(v.index, []).append(st)
                continue
            lo, n = self._touch_region(phase, touch)
            if touch.exec_fraction > 0 and self.mmu.nx_exec is not None:
                self.mmu.nx_exec.add(lo, n, touch.exec_fraction)
            for i, v in enumerate(active):
                a, m = (lo, n) if touch.sharing == "shared" else split_region(lo, n, len(active), i)
                if m <= 0:
                    continue
                rng = stream(self.seed, self.replication, f"workload/{phase.name}/{ti}/vcpu{v.index}")

                def factory(touch=touch, a=a, m=m, rng=rng) -> AccessStream:
                    st = make_stream(touch.pattern, a, m, rng=rng, passes=touch.passes, accesses=touch.accesses,
                                     zipf_s=touch.zipf_s, hot_fraction=touch.hot_fraction,
                                     hot_probability=touch.hot_probability)
                    st.access_ns = touch.access_ns
                    return st
                st = RepeatingStream(factory, lambda: self._vmm_running) if touch.until == "vmm" else factory()
                if touch.until == "vmm":
                    planned = None
                elif planned is not None:
                    planned += m * touch.passes if touch.pattern == "sequential" else touch.accesses
                per_vcpu.setdefault(v.index, []).append(st)
        for idx, streams in sorted(per_vcpu.items()):
            st = streams[0] if len(streams) == 1 else ChainedStream(streams)
            self.vcpus[idx].assign(st, on_done)
        self._phase_planned = planned
        return len(per_vcpu)

    def _run_phases(self) -> Generator:
        env = self.env
        for pi, phase in enumerate(self.scenario.phases):
            self._phase_index = pi
            self._phase_accesses0 = sum(v.accesses for v in self.metrics.vcpus)
            done_ev = env.event()
            pending = {"n": 0}

            def one_done(_v: Vcpu, pending=pending, done_ev=done_ev) -> None:
                pending["n"] -= 1
                if pending["n"] == 0 and not done_ev.triggered:
                    done_ev.succeed()

            vmm_rng = stream(self.seed, self.replication, f"vmm/{phase.name}")
            self._vmm_running = True
            script = phase_ops(phase, vmm_rng)
            self._phase_ops = (len(self.metrics.ioctl_ops), len(script))
            vmm_proc = env.process(self.vmm.run_script(script))
            vmm_proc.callbacks.append(self._vmm_finished)
            pending["n"] = self._start_streams(phase, one_done)
            if pending["n"]:
                yield done_ev
            yield vmm_proc
            self.metrics.phase_end_ns[phase.name] = env.now
        self.metrics.completion_ns = env.now

    def _vmm_finished(self, _ev: simpy.Event) -> None:
        self._vmm_running = False

    # -- progress -------------------------------------------------------------------
    def status(self) -> RunStatus:
        """Where the run is now (for progress reports; see :mod:`desim.progress`)."""
        phases = self.scenario.phases
        done_acc = sum(v.accesses for v in self.metrics.vcpus) - self._phase_accesses0
        before, nops = self._phase_ops
        if self._phase_planned:
            frac = done_acc / self._phase_planned
        elif nops:
            frac = (len(self.metrics.ioctl_ops) - before) / nops
        else:
            frac = 0.0
        frac = min(max(frac, 0.0), 1.0)
        faults = sum(v.total_faults for v in self.metrics.vcpus)
        return RunStatus(self.env.now, phases[self._phase_index].name, self._phase_index, len(phases),
                         (self._phase_index + frac) / len(phases), faults)

    def _checkpoints(self, progress: Callable[[RunStatus], None]) -> Generator:
        """Report ``status()`` at simulated-time checkpoints, spaced so that one comes every
        0.05-0.5 s of wall time. It only reads the model, so results do not change."""
        step = 100_000.0  # 100 us simulated, to start with
        last = time.perf_counter()
        while True:
            yield self.env.timeout(step)
            now = time.perf_counter()
            if now - last < 0.05:
                step *= 2
            elif now - last > 0.5:
                step = max(step / 2, 1_000.0)
            last = now
            progress(self.status())

    def run(self, progress: Callable[[RunStatus], None] | None = None) -> "RunResult":
        main = self.env.process(self._run_phases())
        if self.profile.kernel.nx_huge_pages:
            self.env.process(nx_huge_page_recovery_worker(self))
        limit = self.scenario.time_limit_ms * 1e6
        if progress is not None:
            # desim/cohort.py takes this read-only process's steps inside its loops
            self.checkpoints = self.env.process(self._checkpoints(progress))
        self.env.run(until=simpy.AnyOf(self.env, [main, self.env.timeout(limit)]))
        if not main.triggered:
            raise DesimInputError(f"scenario {self.scenario.name}: did not finish within time_limit_ms = "
                                  f"{self.scenario.time_limit_ms:g} simulated ms (raise time_limit_ms)")
        if not main.ok:  # pragma: no cover - an exception inside the model
            raise main.value
        for v in self.vcpus:
            v._set_mode(v.mode)  # close the time accounting
        lock_summary = self.lock.summary()
        summary = self.metrics.summary(lock_summary)
        summary.update(self.hostmm.summary())
        return RunResult(scenario=self.scenario.name, policy=self.policy_name, seed=self.seed,
                         replication=self.replication, model_version=model_fingerprint(),
                         metrics=summary, per_vcpu=self.metrics.per_vcpu_rows(), raw=self.metrics,
                         memory_bytes=self.mmu.memory_bytes())


@dataclass
class RunResult:
    """What one replication of one policy produced."""

    scenario: str
    policy: str
    seed: int
    replication: int
    model_version: str
    metrics: dict[str, Any]
    per_vcpu: list[dict[str, Any]]
    raw: Metrics | None = field(default=None, repr=False)
    memory_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "policy": self.policy, "seed": self.seed,
                "replication": self.replication, "model_version": self.model_version,
                "metrics": {k: _plain(v) for k, v in self.metrics.items()},
                "per_vcpu": [{k: _plain(v) for k, v in r.items()} for r in self.per_vcpu]}


def _plain(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


def run_scenario(scenario: Scenario, policy: str | None = None, seed: int = 0, replication: int = 0,
                 audit: bool = False, progress: Callable[[RunStatus], None] | None = None,
                 engine: str | None = None) -> RunResult:
    """Run one replication of ``scenario`` under ``policy`` (default: the scenario's, else fast).

    ``progress`` receives a :class:`desim.progress.RunStatus` at simulated-time
    checkpoints; the results are the same with or without it. ``engine`` is ``fast`` or
    ``reference`` (:mod:`desim.engine`; None: ``$DESIM_ENGINE``, else the default); the
    results are the same on both.
    """
    return Vm(scenario, scenario.resolved_policy(policy), seed, replication, audit=audit,
              engine=engine).run(progress)
