"""Cohort runs: several vCPUs' guest runs and faults taken in one loop, in SimPy's event order (fast engine).

A fault run (:mod:`desim.faultrun`) advances one vCPU while its next step is due
before anything else; among many busy vCPUs that is almost never the case, and
every guest run and every fault wait goes through SimPy: an event, the
``Environment.step`` round trip and a resumption of the vCPU's generator. A
lock storm (every fault takes ``mmu_lock`` exclusively: the legacy MMU, shadow
paging, every kernel before 5.12) and many TDP vCPUs faulting at once are made
of nothing else.

:meth:`Cohort.run` processes the head of the event queue itself for as long as
it is a step of a vCPU in one of the three states of the fault cycle:

* the end of a guest run that ends in a fault on a valid memslot
  (:meth:`~desim.vcpu.Vcpu._run_end`: the accounting, ``kvm_faultin_pfn`` and
  the acquisition of ``mmu_lock``), after which the vCPU may wait;
* the end of a host allocation's wait (:mod:`desim.hostmm`), then ``mmu_lock``;
* the hand-over of ``mmu_lock`` to a waiting vCPU (the fault under the lock:
  :meth:`~desim.vcpu.Vcpu._fault_locked`);

and after each the vCPU's next guest run (:meth:`~desim.vcpu.Vcpu._begin_run`),
plus the lock's own timers (:meth:`desim.lock.MmuLock._timer_cb`). Every other
event (the VMM, a kick, a request, an SRCU sync, a memslot update, a progress
checkpoint, a vCPU halting or starting a new chunk) ends the loop where it is
due: the vCPUs are handed back to their processes in the state they are in,
each waiting on the event it waits on, and the process goes on from there
(:meth:`~desim.vcpu.Vcpu._handed_back`).

Planned faults. Where a vCPU's next faults are plain 4 KiB faults on a 4 KiB-backed
slot (no NX huge pages, no other vCPU's fault on the same gfn, or with PTE prefetch
in the same aligned group of ``PTE_PREFETCH_NUM``, meanwhile), the loop finds them in
one vectorised lookup (:class:`_Plan`: the positions of the misses in the vCPU's
chunk, each page's residency, "ever mapped" and page-table pages, from
:meth:`desim.mmu.Mmu.plan_install_4k`; with the legacy MMU's or shadow paging's
``direct_pte_prefetch``, the neighbours each fault maps and the accesses that then
hit, from :meth:`desim.mmu.Mmu.plan_prefetch_4k`) and takes each fault without the SPTE
lookups: the timeline, costs, ``kvm_faultin_pfn``'s host allocation
(:meth:`desim.hostmm.HostMm.first_touch`), ``mmu_lock``
(:meth:`desim.lock.MmuLock.acquire` / ``release_after``, held for the install and
``prefetch_spte`` per prefetched neighbour) and the fault's record
are the same calls and float operations as :mod:`desim.vcpu`'s, in the same
order; the SPTE installs (the prefetched ones too) are applied in one step
(:meth:`desim.mmu.Mmu.commit_install_4k`) before anything else can look at the
SPTE state: before a vCPU takes a step the plain way, and when the loop ends.

Why it is exact: the loop takes the events in SimPy's own queue, in its own
order (time, priority, id), and schedules the events it creates in that queue
with SimPy's own ids, in the order the per-event path would create them; it
processes only the head of the queue, as :meth:`simpy.Environment.step` would,
and runs the same model code for each step (:mod:`desim.vcpu`,
:mod:`desim.lock`, :mod:`desim.hostmm`, :mod:`desim.mmu`). What it leaves out is
the generator resumption and the loop of :meth:`desim.vcpu.Vcpu.run` around the
steps, which the steps taken here do not need (nothing is pending: no request,
no obsolete root, no SRCU writer waiting for the vCPU, the chunk not at its end;
each checked before the step is taken). ``tests/test_engines_differential.py``
compares both engines bit for bit on lock storms, read-locked TDP faults of many
vCPUs, ties at equal times and runs split by memslot updates, kicks and
checkpoints.
"""
from __future__ import annotations

import os
from heapq import heappop, heappush
from typing import TYPE_CHECKING

import numpy as np
from simpy.events import NORMAL, Event

from .lock import MmuLock
from .mmu import PTE_PREFETCH_NUM

if TYPE_CHECKING:  # pragma: no cover
    from .vcpu import Vcpu
    from .vm import Vm

_BACKOFF_MAX = 64  # loop tops to skip after attempts that took (almost) nothing
_LOCK_CALLBACKS = (MmuLock._timer_cb, MmuLock._release_cb)
_PLAN_ACCESSES = 4096  # accesses of a vCPU's chunk looked at per plan, at most
_PLAN_ACCESSES_KERNEL = 1 << 16  # with the compiled kernel (each of its calls costs about as much as 100s of faults;
# its plans grow eight-fold: a speed heuristic only)
_PLAN_WINDOW0_KERNEL = 4096  # the first plan's window with the kernel
_PLAN_WINDOW0 = 512  # the first plan's window; then twice the accesses the vCPU's last plan lasted, within
# [_PLAN_WINDOW0 / 4, _PLAN_ACCESSES]: planning costs per fault planned, and a plan dropped early (the loop
# ends, another vCPU's plan clashes) wastes the rest (a speed heuristic only: what is taken is exact)
_KERNEL = os.environ.get("DESIM_COHORT_KERNEL", "1") != "0"  # "0": the Python steps only (tests, profiling)
_KERNEL_SEGMENT = 512  # a plan's faults handed to one kernel call, at most: a call copies each vCPU's segment
# (its plan arrays and cost draws) in and stops where the first segment ends, so its cost follows the steps it
# can take, not the plans' lengths (a speed heuristic only: where the kernel stops, the Python steps go on)
_PLAN_EXTEND = 8192  # accesses a plan is extended by (Cohort._extend; a speed heuristic only)
_PLAN_MIN = 32  # a plan with fewer faults makes the next plans wait (planning costs about as much as 10-20 faults)
_PLAN_FLOOR = 512  # accesses a plan looks at, at least, however near the loop's horizon (Cohort._horizon_of; a speed
# heuristic only)
_NO_LO = np.iinfo(np.int64).max  # Cohort._rlo of a vCPU without a plan
_SCAN_PLANS = 32  # with more plans, the plans near a gfn are found with Cohort._overlapping, not a loop over all


_GROUP_SHIFT = PTE_PREFETCH_NUM.bit_length() - 1  # gfn >> _GROUP_SHIFT: its aligned group of PTE_PREFETCH_NUM
_NO_PF = np.zeros(0, dtype=np.int64)


def _plan_kernel():
    """:mod:`desim.plan_kernel` (numba), imported on first use."""
    from . import plan_kernel

    return plan_kernel


def _bounds(fg: np.ndarray, prefetch: bool) -> tuple[int, int]:
    """The gfns a plan's faults ``fg`` install or read: their range, or with PTE prefetch their groups'."""
    lo, hi = int(fg.min()), int(fg.max())
    if prefetch:
        return lo & ~(PTE_PREFETCH_NUM - 1), hi | (PTE_PREFETCH_NUM - 1)
    return lo, hi


class _Plan:
    """A vCPU's next guest runs, each ending in a plain 4 KiB fault or, on a plain stream, at the end of a
    chunk (see the module docstring). Per run (arrays, in plan coordinates: 0 is where the vCPU's chunk began
    when the plan was made, the next chunks following on): ``fpos`` where it ends, ``gfns`` its fault's gfn
    (-1: a chunk end), ``resident`` and ``ever`` (a chunk end: 1 and 0), ``npf`` the neighbours its fault
    prefetches (``direct_pte_prefetch``; their gfns: ``pf[pf_ptr[f]:pf_ptr[f + 1]]`` for fault ``f``, an index
    into ``install``). ``k`` runs begun, ``locked`` of
    them done (a fault under ``mmu_lock``, a chunk end at its end), ``committed`` of those applied to the
    SPTE state; ``step`` is where the run ``locked`` is: ``idle`` (not begun), ``run`` (in flight) or
    ``pending`` (its fault past ``kvm_faultin_pfn``, waiting or about to take ``mmu_lock``). ``fidx``: the
    faults before each run (an index into ``install``); ``cbase``: where the vCPU's current chunk begins."""

    __slots__ = ("ss", "install", "fpos", "gfns", "_gset", "resident", "ever", "k", "locked",
                 "committed", "step", "lo", "hi", "fk_code", "fk_ptr", "arrays", "nres", "fidx", "cbase", "pos0",
                 "noext", "npf", "pf", "pf_ptr")

    def __init__(self, ss, install, arrays, fidx, pos0, pf, pf_ptr) -> None:
        self.ss = ss
        self.install = install
        self.arrays = arrays  # int64 rows: fpos, gfns, resident, ever, npf (the compiled kernel's view)
        self.fpos, self.gfns, self.resident, self.ever, self.npf = arrays
        self.pf, self.pf_ptr = pf, pf_ptr
        self.fidx = fidx
        self._gset = None
        self.k = 0
        self.locked = 0
        self.committed = 0
        self.step = "idle"
        self.cbase = 0
        self.pos0 = pos0
        self.noext = False  # Cohort._extend found nothing to add

    @property
    def gset(self) -> set:
        """The plan's gfns as a set (made on first use: most plans are never asked)."""
        if self._gset is None:
            self._gset = set(self.install.gfns.tolist())
        return self._gset

    def fkeys(self, k: int):
        """The page-table pages (level, index) run ``k``'s fault allocates unless one is there."""
        a, b = self.fk_ptr[k:k + 2].tolist()
        return [(c & 3, c >> 2) for c in self.fk_code[a:b].tolist()] if b > a else ()

    def nres_from(self, b: int) -> int:
        """How many of the runs from ``b`` on end in a fault that finds its host page resident, or at a
        chunk's end."""
        return int(self.nres[b]) if b < len(self.nres) else 0


def _reader(view, name: str):
    """A zero-argument callable giving what the next read of ``view.<name>`` gives (a draw, or the value)."""
    d = view.draws(name)
    if d is not None:
        return d.next
    value = getattr(view, name)
    return lambda: value


class _Costs:
    """One vCPU's fault costs as readers (the same draws, in each stream's order, as reading ``P.<name>``)."""

    __slots__ = ("fault_handle", "faultin_resident", "host_alloc_4k", "vm_entry", "vm_exit", "spte_install",
                 "pt_page_alloc", "prefetch_spte")

    def __init__(self, P) -> None:
        for name in self.__slots__[:6]:
            setattr(self, name, _reader(P, name))
        self.pt_page_alloc = P.pt_page_alloc  # per-unit costs are never drawn (desim.costs.PER_UNIT_COSTS)
        self.prefetch_spte = P.prefetch_spte


class Cohort:
    """The fast engine's loop over the steps of many vCPUs (see the module docstring)."""

    plan_shadow = False  # plan faults under shadow paging too (tests: the plans' exactness there)

    def __init__(self, vm: "Vm") -> None:
        self.vm = vm
        self.env = vm.env
        self.backoff = 0  # loop tops to leave to the per-event path before trying again
        self._misses = 0
        self._procs: dict | None = None  # id of a process -> its vCPU
        self._plans: dict = {}  # vCPU -> its _Plan (while the loop runs)
        k = vm.profile.kernel
        self._prefetch = k.pte_prefetch
        self._need_accessed = k.mmu == "shadow"  # prefetch needs the guest PTE's Accessed bit (FNAME(pte_prefetch))
        # TDP MMU faults take mmu_lock for read (a qrwlock): their common case is taken inline (_read_lock)
        self._shared = vm.lock.kind == "rwlock" and vm.fault_lock_mode == "read"
        # no plans under shadow paging unless asked (tests): its guest page-table writes and CR3 loads end the loop
        # every few faults, so nearly every plan made is dropped unused (shadow-pvm's boot-32g-churn, shrunk as in
        # tests/test_operational_laws.py, targeted zap: 21-29 CPU-s with plans, 4.8 without, 5.5 on the reference
        # engine; 24x more faults planned than taken). A speed heuristic: the steps taken are the same.
        self._plannable = vm.mmu.nx_exec is None and (k.mmu != "shadow" or self.plan_shadow)
        self.steps = 0  # vCPU steps taken here (for benchmarks and tests)
        self.planned = 0  # faults taken from plans (their steps counted in ``steps``)
        self.planned_ahead = 0  # faults put in plans, new or extended, taken or dropped (for tests)
        self.shared_tables = 0  # page-table pages a plan would have allocated, found allocated by another fault
        self.kernel_shared = 0  # kernel steps taken while other readers held mmu_lock (desim/cohort_bridge.py)
        self._costs: dict = {}  # vCPU -> _Costs
        self._active = False  # a loop is running (a process resumed from it must not start another)
        self._skip: dict = {}  # vCPU -> (guest runs to begin the plain way before planning again, mmu.zap_seq then)
        self._misses_of: dict = {}
        self._vmm_alloc = _reader(vm.P, "host_alloc_4k")
        # fault and access-stall records of planned faults, in order, appended to the metrics at each flush
        self._lat: list = []
        self._start: list = []
        self._refault: list = []
        self._stall_start: list = []
        self._stall_lat: list = []
        self._stall_a: list = []
        self.runs = 0  # loops that took at least one step
        self._window: dict = {}  # vCPU -> accesses its next plan looks at (Cohort._retire)
        self._horizon = float("inf")  # when the running loop ends at the latest (Cohort._horizon_of)
        self._hits_only = False  # the last plan found no miss in its window (Cohort._back_off)
        self._vidx: dict | None = None  # vCPU -> its index (desim/cohort_bridge.py)
        self.kernel = _KERNEL  # planned steps in the compiled kernel (desim/cohort_kernel.py)
        self._kcosts: dict = {}  # vCPU -> per kernel cost: (row, its _Draws or None, its value if constant)
        self._kskip = 0  # loop tops to leave to the Python steps before trying the kernel again
        self._kmiss = 0
        self.kernel_steps = 0  # vCPU steps the kernel took (for benchmarks and tests)
        self.chunk_ends_planned = 0  # chunk ends crossed inside plans (for tests)
        self.prefetched_planned = 0  # SPTEs planned faults prefetched, kernel's included (for tests)
        self.kernel_checkpoints = 0  # progress checkpoints taken inside kernel calls (for tests)
        self._kseg = _KERNEL_SEGMENT  # a plan's faults handed to one kernel call, at most (desim/cohort_bridge.py)
        self._kgrow = False  # the last kernel call of this loop stopped at a plan's end: extend the plans first
        # each plan's gfn range by vCPU (Cohort._track: no plan, [_NO_LO, -1]): the plans whose range meets a
        # gfn range found in one numpy test instead of a loop over every plan (a speed structure only)
        self._rlo: np.ndarray | None = None
        self._rhi: np.ndarray | None = None
        self._rpos: dict = {}  # vCPU -> its row in _rlo/_rhi
        self._rvcpus: list = []

    def _missed(self) -> None:
        self._misses = min(2 * self._misses + 1, _BACKOFF_MAX)
        self.backoff = self._misses

    @staticmethod
    def _state(x: "Vcpu", ev: Event) -> tuple | None:
        """The state of a vCPU whose process waits on ``ev``: ``(kind, t0, ctx)`` with kind ``run`` (the
        guest run in ``_run`` ends), ``host`` (a host allocation's wait since ``t0``) or ``lock``
        (``mmu_lock`` waited for since ``t0``); None where the process waits on anything else."""
        if x._wait is not ev or x.proc._target is not ev:
            return None
        if x._handback is not None:
            return x._handback
        wc = x._wait_ctx
        if wc is None:
            return ("run", None, None)
        t0, ctx = wc
        return ("host" if ctx[0] == "host" else "lock", t0, ctx)

    def _track(self, x: "Vcpu", p: "_Plan | None") -> None:
        """Record ``x``'s plan's gfn range (``p``: its plan in ``_plans``, None: it has none)."""
        i = self._rpos[x]
        if p is None:
            self._rlo[i], self._rhi[i] = _NO_LO, -1
        else:
            self._rlo[i], self._rhi[i] = p.lo, p.hi

    def _overlapping(self, lo: int, hi: int) -> list:
        """The vCPUs whose plan's gfn range meets [lo, hi] (in vCPU order)."""
        vs = self._rvcpus
        return [vs[j] for j in np.flatnonzero((self._rlo <= hi) & (self._rhi >= lo)).tolist()]

    # -- plans ---------------------------------------------------------------------
    def _plan(self, x: "Vcpu") -> _Plan | None:
        """Plan ``x``'s next faults from its position in its chunk (None: none can be planned). On a plain
        stream (:meth:`desim.workload.AccessStream.peek_chunk`) the plan reaches into the next chunks: each
        chunk end it crosses is one more guest run, the one :meth:`desim.vcpu.Vcpu.run` makes there (the
        chunk's last accesses, without an exit or a fault; the next chunk's first run draws its own VM
        entry). A plan ends at a fault."""
        if not self._plannable:
            return None
        window = min(self._window.get(x, _PLAN_WINDOW0_KERNEL if self.kernel else _PLAN_WINDOW0), self._reach(x))
        # plan coordinates: 0 where the vCPU's chunk begins, the next chunks after it
        seg, bounds = self._segment(x, 0, x._pos, window)
        self._hits_only = False
        got = self._plan_seg(x, seg, x._pos, bounds, None)
        if got is None:
            return None
        arrays, fidx, install, fk_code, fk_ptr, lo, hi, pf, pf_ptr = got
        self.planned_ahead += len(install.gfns)
        out = _Plan(install.ss, install, arrays, fidx, x._pos, pf, pf_ptr)
        out.lo, out.hi = lo, hi
        out.fk_code, out.fk_ptr = fk_code, fk_ptr
        out.nres = np.cumsum(arrays[2, ::-1])[::-1]  # runs from each on that allocate no host page
        return out

    def _segment(self, x: "Vcpu", cbase: int, start: int, window: int):
        """The next ``window`` accesses of ``x`` from plan coordinate ``start`` (its chunk begins at ``cbase``,
        the next chunks of a plain stream follow), and where each chunk after the first begins (plan
        coordinates)."""
        chunk = x._chunk
        off = start - cbase
        cstart = cbase
        j = 0  # the chunks after the current one, peeked
        stream = x.stream
        while off >= len(chunk):
            off -= len(chunk)
            cstart += len(chunk)
            chunk = stream.peek_chunk(j) if (self.kernel and stream is not None) else None
            j += 1
            if chunk is None or len(chunk) == 0:
                return chunk[:0] if chunk is not None else x._chunk[:0], []
        seg = chunk[off:off + window]
        bounds: list[int] = []
        if len(seg) < window and self.kernel and stream is not None:
            parts = [seg]
            total, nxt = len(seg), cstart + len(chunk)
            while total < window:
                ch = stream.peek_chunk(j)  # None for anything but a plain stream
                if ch is None or len(ch) == 0:
                    break
                j += 1
                bounds.append(nxt)
                parts.append(ch[:window - total])
                total += len(parts[-1])
                nxt += len(ch)
            if bounds:
                seg = np.concatenate(parts)
        return seg, bounds

    def _plan_seg(self, x: "Vcpu", seg, pos: int, bounds: list, own: _Plan | None):
        """The runs of a plan over ``seg`` (its first access at plan coordinate ``pos``, chunk starts at
        ``bounds``): ``(arrays, fidx, install, fk_code, fk_ptr, lo, hi, pf, pf_ptr)``, or None. ``own``: the
        vCPU's plan this one continues (its gfns, faulted or prefetched, are mapped by the time these faults
        come: they are not faults; the continuation keeps to its memslot).

        With PTE prefetch (the legacy MMU's ``direct_pte_prefetch`` / ``__direct_pte_prefetch``,
        arch/x86/kvm/mmu/mmu.c; shadow paging's ``FNAME(pte_prefetch)``, paging_tmpl.h) a fault reads and maps
        its whole aligned group of ``PTE_PREFETCH_NUM`` gfns: what each fault prefetches
        is :meth:`desim.mmu.Mmu.plan_prefetch_4k` of the state now, which holds as long as nothing else
        changes those groups. So a plan owns its faults' groups: ``lo``/``hi`` bound them, another plan stops
        before its first miss in one of them (here), and a plain step on a gfn in one ends the loop
        (:meth:`_clashes`)."""
        mmu = self.vm.mmu
        if len(seg) == 0:
            return None
        pk = _plan_kernel() if self.kernel else None  # the same results, compiled (desim/plan_kernel.py)
        misses = mmu.first_misses(seg) if pk is None else pk.first_misses(mmu, seg)
        if misses is None:
            self._hits_only = True  # every access of the window hits (Cohort._back_off)
            return None
        fpos, fg = misses
        prefetch = self._prefetch
        done = None  # the gfns ``own`` maps (faults and prefetched neighbours)
        if own is not None:
            if int(fg.min()) <= own.hi and own.lo <= int(fg.max()):
                done = own.install.gfns
                if prefetch and len(own.pf):
                    done = np.concatenate((done, own.pf))
                keep = ~np.isin(fg, done) if pk is None else pk.not_in(fg, done)
                fpos, fg = fpos[keep], fg[keep]
                if len(fg) == 0:
                    return None
            ss = own.ss
            if mmu.slots.get(ss.slot.id) is not ss:
                return None
        else:
            ss = mmu.slot_of(int(fg[0]))
        if ss is None or ss.slot.invalid or ss.block.backing != "4k":
            return None
        base, end = ss.slot.base_gfn, ss.slot.end_gfn
        outside = np.flatnonzero((fg < base) | (fg >= end))
        K = int(outside[0]) if len(outside) else len(fg)
        if K == 0:
            return None
        fpos, fg = fpos[:K], fg[:K]
        lo, hi = _bounds(fg, prefetch)
        plans = self._plans
        others = [plans[v] for v in self._overlapping(lo, hi) if v is not x]
        if others:
            # another plan's gfn (installed by it, or to be; with PTE prefetch its group): this vCPU's view of
            # the SPTEs would be stale
            taken = np.concatenate([p.install.gfns for p in others])
            if prefetch:
                clash = np.flatnonzero(np.isin(fg >> _GROUP_SHIFT, taken >> _GROUP_SHIFT))
            else:
                clash = np.flatnonzero(np.isin(fg, taken))
            if len(clash):
                K = int(clash[0])
                if K == 0:
                    return None
                fpos, fg = fpos[:K], fg[:K]
                lo, hi = _bounds(fg, prefetch)
        pf = pf_ptr = npf = None
        if prefetch:
            # direct_pte_prefetch: each group's first fault maps the group's eligible neighbours, whose
            # accesses then hit (Vcpu._fault_locked, Mmu.prefetch_candidates)
            pp = (mmu.plan_prefetch_4k(ss, fg, self._need_accessed, done) if pk is None
                  else pk.plan_prefetch_4k(mmu, ss, fg, self._need_accessed, done))
            if pp is None:
                return None
            fault, members, take = pp
            if not fault.all():
                fpos, fg = fpos[fault], fg[fault]
                K = len(fg)
            npf = take.sum(axis=1)
            pf = members[take]
            pf_ptr = np.zeros(K + 1, dtype=np.int64)
            np.cumsum(npf, out=pf_ptr[1:])
        plan = mmu.plan_install_4k(ss, fg) if pk is None else pk.plan_install_4k(mmu, ss, fg)
        if plan is None:
            return None
        # the page-table pages each fault would allocate: whether it does is decided when it is under
        # mmu_lock (another plan's fault may have allocated the page first: _locked_planned)
        fi, fc = [], []
        for lvl, (shift, nf) in plan.new_tables.items():
            fi.append(nf)
            fc.append((fg[nf] >> shift) * 4 + lvl)
        afpos = fpos + pos
        # per fault, its page-table pages (level + 4 * index; levels in new_tables' order), as offsets
        # into fk_code
        fi = np.concatenate(fi) if fi else np.zeros(0, np.int64)
        order = np.argsort(fi, kind="stable")
        fk_code = (np.concatenate(fc) if fc else np.zeros(0, np.int64))[order]
        fk_ptr = np.searchsorted(fi[order], np.arange(K + 1), side="left")
        # the runs: one per fault, and one per chunk end crossed before the last fault (a chunk's end
        # comes before a fault on the next chunk's first access)
        n_ends = int(np.searchsorted(bounds, int(afpos[-1]), side="right")) if bounds else 0
        resident = plan.resident
        ever = plan.ever_mapped
        if n_ends:
            ends = np.asarray(bounds[:n_ends], dtype=np.int64)
            # where each fault's run goes: after the faults and chunk ends before it
            at = np.arange(K) + np.searchsorted(ends, afpos, side="right")
            R = K + n_ends
            arrays = np.empty((5, R), dtype=np.int64)
            is_end = np.ones(R, dtype=bool)
            is_end[at] = False
            arrays[0, is_end] = ends
            arrays[1, is_end] = -1
            arrays[2, is_end] = 1
            arrays[3, is_end] = 0
            arrays[4, is_end] = 0
            arrays[0, at] = afpos
            arrays[1, at] = fg
            arrays[2, at] = resident
            arrays[3, at] = ever
            arrays[4, at] = 0 if npf is None else npf
            fidx = np.empty(R + 1, dtype=np.int64)
            fidx[0] = 0
            np.cumsum(~is_end, out=fidx[1:])
            fk_ptr = fk_ptr[fidx]
        else:
            arrays = np.stack((afpos, fg, resident, ever, np.zeros(K, np.int64) if npf is None else npf)
                              ).astype(np.int64, copy=False)
            fidx = np.arange(K + 1)
        if pf is None:
            pf, pf_ptr = _NO_PF, np.zeros(K + 1, dtype=np.int64)
        return arrays, fidx, plan, fk_code, fk_ptr, lo, hi, pf, pf_ptr

    def _extend(self, x: "Vcpu", p: _Plan) -> bool:
        """Make ``x``'s plan go on past its last fault (the faults a new plan made there would find, given
        that this plan's faults are done by then), its done runs dropped: the compiled kernel is then not
        stopped where plans end (a speed heuristic only: what is planned is what a new plan would plan)."""
        if p.noext:
            return False
        self._commit(x, p, False)
        last = int(p.fpos[-1])
        window = min(_PLAN_EXTEND, x._pos + p.cbase + self._reach(x) - last)
        if window <= 0:
            p.noext = True  # past the loop's horizon already
            return False
        seg, bounds = self._segment(x, p.cbase, last, window)
        got = self._plan_seg(x, seg, last, bounds, p)
        if got is None:
            p.noext = True
            return False
        arrays, fidx, install, fk_code, fk_ptr, lo, hi, pf, pf_ptr = got
        self.planned_ahead += len(install.gfns)
        d = p.locked  # the runs done (and committed): dropped
        f0 = int(p.fidx[d])
        q0 = int(p.pf_ptr[f0])
        nf_old = len(p.install.gfns) - f0
        c0 = int(p.fk_ptr[d])
        ncode_old = len(p.fk_code) - c0
        ip = p.install
        p.install = type(ip)(ip.ss, np.concatenate((ip.gfns[f0:], install.gfns)),
                             np.concatenate((ip.state[f0:], install.state)),
                             np.concatenate((ip.resident[f0:], install.resident)),
                             np.concatenate((ip.ever_mapped[f0:], install.ever_mapped)),
                             np.concatenate((ip.allocated[f0:], install.allocated)), {})
        p.arrays = np.concatenate((p.arrays[:, d:], arrays), axis=1)
        p.fpos, p.gfns, p.resident, p.ever, p.npf = p.arrays
        p.pf = np.concatenate((p.pf[q0:], pf))
        p.pf_ptr = np.concatenate((p.pf_ptr[f0:-1] - q0, pf_ptr + (int(p.pf_ptr[-1]) - q0)))
        p.fidx = np.concatenate((p.fidx[d:-1] - f0, fidx + nf_old))
        p.fk_code = np.concatenate((p.fk_code[c0:], fk_code))
        p.fk_ptr = np.concatenate((p.fk_ptr[d:-1] - c0, fk_ptr + ncode_old))
        p.nres = np.cumsum(p.arrays[2, ::-1])[::-1]
        p.k -= d
        p.locked = p.committed = 0
        p.lo, p.hi = min(p.lo, lo), max(p.hi, hi)
        self._track(x, p)
        p._gset = None
        return True

    def _commit(self, x: "Vcpu", p: _Plan, final: bool) -> None:
        """Apply the SPTE installs of ``x``'s planned faults done under ``mmu_lock`` since the last commit
        (as :meth:`desim.mmu.Mmu.make_resident` / ``install`` did for each); ``final``: also the host page
        of a fault past ``kvm_faultin_pfn``, which the vCPU's own code finishes."""
        mmu = self.vm.mmu
        c, k = p.committed, p.locked
        if k > c:
            p.committed = k
            c, k = int(p.fidx[c]), int(p.fidx[k])  # the faults among those runs
            if k > c:
                ip = p.install
                sub = type(ip)(ip.ss, ip.gfns[c:k], ip.state[c:k], ip.resident[c:k], ip.ever_mapped[c:k],
                               ip.allocated[c:k], {})
                mmu.commit_install_4k(sub, k - c, tables=False)  # the page-table pages are linked already
                a, b = int(p.pf_ptr[c]), int(p.pf_ptr[k])
                if b > a:
                    mmu.commit_prefetch_4k(p.ss, p.pf[a:b])  # the neighbours they prefetched
                x._seq = -1  # the vCPU's cached miss list predates these installs
        k = p.locked
        if final and p.step == "pending" and not p.resident[k]:
            mmu.make_resident(p.ss, int(p.gfns[k]), 1)

    def _horizon_of(self, queue: list, procs: dict) -> float:
        """The time of the first event in SimPy's queue that ends a loop (anything but a vCPU's step, one of
        ``mmu_lock``'s timers or a progress checkpoint: the VMM, a kick, an SRCU sync...). No vCPU gets past it
        in the loop, and the loop's plans are dropped when it ends (Cohort._flush): a plan need not look at
        more accesses than fit before it (Cohort._reach). Events made during the loop can only end it
        sooner."""
        lock, ckp = self.vm.lock, self.vm.checkpoints
        horizon = float("inf")
        for t, _, _, ev in queue:
            if t >= horizon:
                continue
            cbs = ev.callbacks
            if cbs and len(cbs) == 1:
                owner = getattr(cbs[0], "__self__", None)
                if id(owner) in procs or (owner is lock and cbs[0].__func__ in _LOCK_CALLBACKS) or (
                        owner is ckp and owner is not None and cbs[0].__func__ is owner._resume.__func__):
                    continue
            horizon = t
        return horizon

    def _reach(self, x: "Vcpu") -> int:
        """The accesses ``x`` can make before the loop's horizon (each takes ``access_ns`` of guest time at least),
        and at least _PLAN_FLOOR (a speed heuristic only: what is planned is taken exactly, whatever its
        length)."""
        dt = self._horizon - self.env._now
        a = x.access_ns
        if dt == float("inf") or a <= 0:
            return _PLAN_ACCESSES_KERNEL
        return max(_PLAN_FLOOR, min(int(dt / a) + 2, _PLAN_ACCESSES_KERNEL))

    def _retire(self, x: "Vcpu", p: _Plan) -> None:
        """``x``'s plan is dropped: size its next plan's window from the accesses this one lasted."""
        used = x._pos + p.cbase - p.pos0
        if self.kernel:
            self._window[x] = min(max(8 * used, _PLAN_WINDOW0 // 4), _PLAN_ACCESSES_KERNEL)
        else:
            self._window[x] = min(max(2 * used, _PLAN_WINDOW0 // 4), _PLAN_ACCESSES)

    def _flush(self, final: bool = False) -> None:
        """Commit every plan and the records of its faults (before a step that reads the SPTE state or records
        a fault; ``final``: when the loop ends)."""
        for x, p in self._plans.items():
            if final:
                self._commit(x, p, True)
                self._retire(x, p)
            elif p.locked > p.committed:  # else nothing to commit
                self._commit(x, p, False)
        self._flush_records()
        if final:
            self._plans.clear()
            if self._rlo is not None:
                self._rlo.fill(_NO_LO)
                self._rhi.fill(-1)

    def _flush_for(self, x: "Vcpu") -> None:
        """Before ``x`` begins a guest run the plain way: commit the plans whose faults its chunk could reach
        (its next miss is looked up in the SPTE state from its position on: a gfn another plan installed,
        not yet committed, would look unmapped) and the records (the plain path records in order). A plan
        whose gfns lie outside the rest of the chunk's gfn range changes nothing that run reads: its own
        fault is a plain step checked against the plans (_clashes), and page-table pages are linked as each
        planned fault takes them (Cohort._locked_planned, desim/cohort_bridge.py)."""
        lo = None
        plans = self._plans
        near = plans.items()
        if len(plans) > _SCAN_PLANS:
            # many plans: only those whose range meets the chunk's (Cohort._overlapping; commits of disjoint
            # plans do not depend on their order)
            rest = x._chunk[x._pos:]
            if len(rest) == 0:
                return self._flush_records()
            lo, hi = int(rest.min()), int(rest.max())
            near = [(v, plans[v]) for v in self._overlapping(lo, hi)]
        for v, p in near:
            k = p.locked
            # a fault past kvm_faultin_pfn has made its host page resident (Vcpu._faultin): the plain run's
            # exit cost reads it (Vcpu._pre_lock_ns), before any check against the plans
            first_touch = p.step == "pending" and not p.resident[k]
            if k > p.committed or first_touch:
                if lo is None:  # the chunk's range, once there is something to commit
                    rest = x._chunk[x._pos:]
                    if len(rest) == 0:
                        break
                    lo, hi = int(rest.min()), int(rest.max())
                if p.lo <= hi and lo <= p.hi:
                    self._commit(v, p, False)
                    if first_touch:
                        self.vm.mmu.make_resident(p.ss, int(p.gfns[k]), 1)
        self._flush_records()

    def _flush_records(self) -> None:
        """Append the planned faults' records to the metrics (before a step that records a fault)."""
        metrics = self.vm.metrics
        if self._lat:
            metrics.record_faults(0, {}, np.array(self._start), np.array(self._lat),
                                  np.array(self._refault, dtype=np.int8))
            self._lat.clear()
            self._start.clear()
            self._refault.clear()
        if self._stall_lat:
            sa = self._stall_a
            a0 = sa[0]
            metrics.record_access_stalls(np.array(self._stall_start), np.array(self._stall_lat), a0)
            hits = metrics.hit_ns
            for a in sa:
                if a != a0:  # counted against a0 above: move the stall to its own access time
                    hits[a0] += 1
                    hits[a] = hits.get(a, 0) - 1
            self._stall_start.clear()
            self._stall_lat.clear()
            sa.clear()

    def _resume_at_top(self, x: "Vcpu", ev: Event) -> None:
        """Resume ``x``'s process now, at the top of its loop (its step is done), as SimPy would go on with it
        within the step that processed ``ev``; it runs until it waits again."""
        env = self.env
        # the process's code reads the SPTE state: the plans' installs and records are committed first.
        # The other vCPUs' plans are kept: the process only begins its vCPU's next guest run here (its
        # fault is a plain step of this loop, checked against the plans: _clashes), once its fault run
        # (which could install SPTEs another plan counts on) is held off for this one resumption.
        p = self._plans.pop(x, None)
        if p is not None:
            self._track(x, None)
            self._commit(x, p, False)
            self._retire(x, p)
        self._flush()
        fr = x.fault_run
        if fr is not None and not fr.backoff:
            fr.backoff = 1
        x._handback = ("top", None, None)
        x._wait = None
        proc = x.proc
        active = env._active_proc
        proc._target = ev
        proc._resume(ev)
        env._active_proc = active

    def _costs_of(self, x: "Vcpu") -> _Costs:
        c = self._costs[x] = _Costs(x.P)
        return c

    def _table_there(self, lk: tuple) -> bool:
        """Is the page-table page ``lk`` (level, index) there: allocated by another fault since the plans
        were made (``kvm_tdp_mmu_map`` / ``direct_map`` link a page only where none is)?"""
        mmu = self.vm.mmu
        return mmu.pt_tags[lk[0]].get(lk[1]) == mmu.root_tag

    def _clashes(self, gfn: int) -> bool:
        """Is ``gfn`` one of a plan's faults, or with PTE prefetch one of its neighbours (a plain step on it would
        change what that plan found)?"""
        # each plan's gfns lie in [lo, hi]: its set is asked only where the range can hold one (with many plans,
        # the plans whose range holds it found in one numpy test: Cohort._overlapping)
        plans = self._plans
        if self._prefetch:
            start = gfn & ~(PTE_PREFETCH_NUM - 1)
            end = start + PTE_PREFETCH_NUM
            near = [plans[v] for v in self._overlapping(start, end - 1)] if len(plans) > _SCAN_PLANS else \
                plans.values()
            return any(p.lo < end and start <= p.hi and any(g in p.gset for g in range(start, end)) for p in near)
        near = [plans[v] for v in self._overlapping(gfn, gfn)] if len(plans) > _SCAN_PLANS else plans.values()
        return any(p.lo <= gfn <= p.hi and gfn in p.gset for p in near)

    # -- planned steps (the same operations as Vcpu._begin_run, _run_end, _faultin, _fault_locked) -------
    def _begin_planned(self, x: "Vcpu", p: _Plan) -> float:
        c = self._costs.get(x) or self._costs_of(x)
        k = p.k
        miss = int(p.fpos[k])
        gfn = int(p.gfns[k])
        n = miss - (x._pos + p.cbase)
        faults = gfn >= 0
        if faults:
            pre = c.fault_handle() + (c.faultin_resident() if p.resident[k] else c.host_alloc_4k())
        now = self.env._now
        carry, x._carry = x._carry, 0.0
        g0 = now + carry
        entry, x._entry = (c.vm_entry() if x._entry is None else x._entry), None
        a = x.access_ns
        g1 = g0 + entry + n * a
        if x._stalled_since is not None and n > 0:
            # Metrics.record_access_stall, appended at the next flush
            self._stall_start.append(x._stalled_since)
            self._stall_lat.append(g0 + entry + a - x._stalled_since)
            self._stall_a.append(a)
            x._recorded_until = g0 + entry + a  # as Vcpu._begin_run
            x._stalled_since = None
        x._g0, x._g1 = g0, g1
        x._running = True
        if x._srcu_waiters:
            x._srcu_unlock_at(g0)
        # a chunk end: the rest of the chunk without an exit (Vcpu._begin_run with the miss at the chunk's end)
        exit_ns = c.vm_exit() + pre if faults else 0.0
        x._run = (now, carry, g0, entry, g1, n, miss - p.cbase, faults, "fault", gfn, exit_ns)
        p.k = k + 1
        p.step = "run"
        return g1 - now + exit_ns

    def _end_planned(self, x: "Vcpu", p: _Plan):
        """The guest run ends in its planned fault: returns None (done), or ``(event, ctx)`` to wait on."""
        now, carry, g0, entry, g1, n, miss, faults, stop, gfn, exit_ns = x._run
        x._running = False
        m = x.m
        t = m.time
        t["host"] += carry + exit_ns
        t["guest"] += g1 - g0
        x._pos += n
        m.accesses += n
        vm = self.vm
        hits = vm.metrics.hit_ns
        hits[x.access_ns] = hits.get(x.access_ns, 0) + n
        if not faults:
            # the chunk's end: the top of Vcpu.run's loop takes the next chunk (a plain stream has no pause;
            # nothing is pending, checked before the step), then begins the next guest run
            p.cbase = int(p.fpos[p.locked])
            x._next_chunk()
            self.chunk_ends_planned += 1
            p.locked += 1
            p.step = "idle"
            return None
        if x._stalled_since is None:
            x._stalled_since = g1
        m.stall_ns += exit_ns
        ctx = (p.ss, gfn, 1, x.root_tag, g1)
        p.step = "pending"
        if not p.resident[p.locked]:
            vm.metrics.host_page_allocs["4k"] += 1
            t_alloc = self.env._now - self._vmm_alloc()
            extra = vm.hostmm.first_touch(x.index, t_alloc, 1)
            if extra > 0:
                return self.env.timeout(extra), ("host", ctx)
        return self._acquire_planned(x, p, ctx)

    def _acquire_planned(self, x: "Vcpu", p: _Plan, ctx: tuple):
        vm = self.vm
        lock = vm.lock
        if self._shared and not lock.waiters and not lock.writer:
            self._read_lock(lock, x)
        else:
            ev = lock.acquire(vm.fault_lock_mode, "fault", x)
            if ev is not None:
                return ev, ctx
        self._locked_planned(x, p, ctx, 0.0)
        return None

    def _read_lock(self, lock: MmuLock, x: "Vcpu") -> None:
        """``MmuLock.acquire(READ, "fault", x)`` when nobody waits and no writer holds the lock (granted at
        once): the deferred releases due are applied and the integrals advanced, the same float
        operations in the same order as ``_catch_up``, ``_advance`` and ``_grant``."""
        now = self.env._now
        pend = lock._pending
        last = lock._last_t
        area = lock._area_holders
        readers = lock.readers
        while pend and pend[0][0] <= now:
            t, _, token = heappop(pend)
            dt = t - last
            if dt:
                area += dt * readers  # no writer, no waiter: _area_waiters += dt * 0 changes nothing
                last = t
            since, role = lock._hold_since.pop(token)
            lock._role(role).hold_ns += t - since
            readers -= 1
        dt = now - last
        if dt:
            area += dt * readers
            last = now
        lock._last_t = last
        lock._area_holders = area
        lock.readers = readers + 1
        lock._hold_since[x] = (now, "fault")
        lock._role("fault").acquisitions += 1

    def _locked_planned(self, x: "Vcpu", p: _Plan, ctx: tuple, handoff: float) -> None:
        vm = self.vm
        c = self._costs.get(x) or self._costs_of(x)
        metrics = vm.metrics
        k = p.locked
        allocated = 0
        for lk in p.fkeys(k):
            if self._table_there(lk):
                self.shared_tables += 1
            else:
                # link the page-table page now, as Mmu.install does (the leaves are committed later)
                mmu = vm.mmu
                mmu.pt_tags[lk[0]][lk[1]] = mmu.root_tag
                mmu.present_pt_level[lk[0]] += 1
                mmu.present_pt += 1
                allocated += 1
        prefetched = int(p.npf[k])  # direct_pte_prefetch: the neighbours it maps (installed at the commit)
        metrics.sptes_prefetched += prefetched
        metrics.sptes_installed += 1 + prefetched
        self.prefetched_planned += prefetched
        metrics.pt_pages_allocated += allocated
        hold = c.spte_install() + allocated * c.pt_page_alloc + prefetched * c.prefetch_spte
        hold += handoff
        if hold:
            lock = vm.lock
            if self._shared and not lock.waiters and not (lock._pending and lock._pending[0][0] <= self.env._now):
                # MmuLock.release_after with nobody waiting: a deferred release
                lock._seq += 1
                heappush(lock._pending, (self.env._now + hold, lock._seq, x))
            else:
                lock.release_after(x, hold)
            x._carry = hold
            x.m.stall_ns += hold
        else:
            vm.lock.release(x)
        now = self.env._now
        x._entry = entry = c.vm_entry()
        start = ctx[4]
        # Metrics.record_fault: counted now, the samples appended at the next flush
        ever = bool(p.ever[k])
        x.m.faults["after_zap" if ever else "first_touch"] += 1
        self._lat.append(now + hold + entry - start)
        self._start.append(start)
        self._refault.append(1 if ever else 0)
        p.locked = k + 1
        p.step = "idle"
        self.planned += 1

    # -- the loop ------------------------------------------------------------------
    def _begin(self, x: "Vcpu") -> float:
        """``x``'s next guest run, planned if it can be, else the plain way (after committing the plans)."""
        plans = self._plans
        p = plans.get(x)
        if p is not None and p.k < len(p.fpos):
            return self._begin_planned(x, p)
        skip = self._skip_left(x)
        if skip:
            self._skip[x] = (skip - 1, self._skip[x][1])
            if p is not None:
                self._commit(x, p, False)
                self._retire(x, p)
                del plans[x]
                self._track(x, None)
        else:
            p = self._replan(x)
            if p is not None and len(p.fpos) >= _PLAN_MIN:
                self._misses_of.pop(x, None)
                return self._begin_planned(x, p)
            # few or no faults ahead (a guest run without faults, hits): plan again later
            self._back_off(x, p is not None or self._hits_only)
            if p is not None:
                return self._begin_planned(x, p)
        self._flush_for(x)
        return x._begin_run()

    def _back_off(self, x: "Vcpu", hits: bool) -> None:
        """Nothing (or too little) to plan for ``x`` here: its next guest runs begin the plain way, twice as many
        as after its last miss (up to _BACKOFF_MAX); ``hits``: because the accesses ahead (almost) all hit, which
        the next zap undoes (Cohort._skip_left), rather than a plan refused (a speed heuristic only)."""
        m = self._misses_of[x] = min(2 * self._misses_of.get(x, 0) + 1, _BACKOFF_MAX)
        self._skip[x] = (m, self.vm.mmu.zap_seq if hits else None)

    def _skip_left(self, x: "Vcpu") -> int:
        """The guest runs ``x`` still begins the plain way (Cohort._back_off). A zap since a backoff for hits began
        ends it where it unmapped some of the rest of ``x``'s chunk (:meth:`desim.vcpu.Vcpu._next_miss`, which its
        next plain guest run would look up anyway): what found nothing to plan no longer holds, and the re-faults
        that follow are what plans are for (a speed heuristic only)."""
        s = self._skip.get(x)
        if s is None:
            return 0
        seq = self.vm.mmu.zap_seq
        if s[1] is not None and s[1] != seq:
            if x._next_miss() < len(x._chunk_list):
                del self._skip[x]
                self._misses_of.pop(x, None)
                return 0
            self._skip[x] = (s[0], seq)  # the zap left this chunk's accesses mapped
        return s[0]

    def _replan(self, x: "Vcpu") -> _Plan | None:
        """A new plan for ``x`` from where it is (its old plan committed and dropped)."""
        plans = self._plans
        old = plans.pop(x, None)
        if old is not None:
            self._track(x, None)
            self._commit(x, old, False)
            self._retire(x, old)
        p = self._plan(x)
        if p is not None:
            plans[x] = p
            self._track(x, p)
        return p

    def run(self, x0: "Vcpu") -> Event | None:
        """Called by ``x0`` at the top of its loop, before it begins a guest run. None when the head of the
        queue is not a vCPU's step (``x0`` goes on by itself); else the loop has begun ``x0``'s guest run,
        taken every vCPU step at the head of the queue, and returns the event ``x0`` must wait on."""
        env = self.env
        queue = env._queue
        vm = self.vm
        if self._active or not env._last_callback or not queue:
            self._missed()
            return None
        procs = self._procs
        if procs is None:
            procs = self._procs = {id(v.proc): v for v in vm.vcpus}
        if self._rlo is None or len(self._rvcpus) != len(vm.vcpus):
            self._rvcpus = list(vm.vcpus)
            self._rpos = {v: i for i, v in enumerate(self._rvcpus)}
            self._rlo = np.full(len(self._rvcpus), _NO_LO, dtype=np.int64)
            self._rhi = np.full(len(self._rvcpus), -1, dtype=np.int64)
        # worth it only if the next event is another vCPU's step
        # (a cheap check, made at every loop top: no backoff for it)
        head = queue[0][3]
        cbs = head.callbacks
        if not cbs or len(cbs) != 1:
            return None
        x = procs.get(id(getattr(cbs[0], "__self__", None)))
        if x is None or x is x0 or self._state(x, head) is None:
            return None
        mmu = vm.mmu
        lock = vm.lock
        eid = env._eid
        plans = self._plans
        self._active = True
        self._horizon = self._horizon_of(queue, procs)
        # x0's guest run begins now, as its own loop would begin it
        ev = Event(env)
        ev._ok, ev._value = True, None
        delay = self._begin(x0)
        heappush(queue, (env._now + delay, NORMAL, next(eid), ev))
        owned = {ev: x0}  # pending event -> the vCPU that waits on it
        state = {x0: ("run", None, None, ev)}  # vCPU -> (kind, t0, ctx, pending event)
        steps = 0
        kernel = self.kernel
        self._kgrow = False
        while queue:
            t, _, _, ev = queue[0]
            x = owned.get(ev)
            if kernel and x is not None:
                if self._kskip:
                    self._kskip -= 1
                else:
                    p = plans.get(x)
                    if p is not None and p.k < len(p.fpos) and p.step != "idle" and len(plans) > 1:
                        # the planned steps at the head of the queue, compiled (desim/cohort_kernel.py)
                        from .cohort_bridge import take  # numba, imported on first use

                        n = take(self, owned, state)
                        eid = env._eid  # the kernel numbered its events and moved SimPy's counter past them
                        steps += n
                        self.kernel_steps += n
                        if n > 2 * len(plans):
                            self._kmiss = 0
                        else:
                            # a call costs O(vCPUs) Python: with many vCPUs, leave more steps to Python (up to
                            # 8 per vCPU: 448 vCPUs on a 16 GiB slice of populate-4t-4k.toml took 28-30 s of CPU
                            # against 35-36 s with 2 per vCPU), and at least one per plan at once (a call's
                            # translation of every planned vCPU costs about what that many Python steps cost). A
                            # speed heuristic only
                            self._kmiss = min(max(2 * self._kmiss + 1, len(plans)), max(_BACKOFF_MAX, 8 * len(state)))
                            self._kskip = self._kmiss
                        if n:
                            continue
            if x is None:
                cbs = ev.callbacks
                if not cbs or len(cbs) != 1:
                    break
                cb = cbs[0]
                owner = getattr(cb, "__self__", None)
                if owner is lock and cb.__func__ in _LOCK_CALLBACKS:
                    heappop(queue)
                    env._now = t
                    ev.callbacks = None
                    cb(ev)
                    continue
                x = procs.get(id(owner))
                if x is None:
                    if owner is not None and owner is vm.checkpoints and cb.__func__ is owner._resume.__func__:
                        # a progress checkpoint (Vm._checkpoints: it only reads the model, after the records
                        # are flushed): its step taken here, as Environment.step would, the loop going on
                        heappop(queue)
                        env._now = t
                        ev.callbacks = None
                        self._flush()
                        active = env._active_proc
                        owner._resume(ev)
                        env._active_proc = active
                        continue
                    break
                st = self._state(x, ev)
                if st is None:
                    break
                kind, t0, ctx = st
                fresh = True
            else:
                kind, t0, ctx, _ = state[x]
                fresh = False
            # the step and the guest run after it must be plain: nothing pending for the vCPU
            if x.requests or x.root_tag != mmu.root_tag or x._srcu_waiters:
                break
            p = plans.get(x)
            if kind == "run":
                if p is None or p.step != "run":
                    r = x._run
                    if r[8] != "fault":
                        break  # a CR3 or guest page-table write (shadow paging: never here)
                    if not r[7]:
                        # the run ends at its chunk's end, without a fault: what comes next (the next chunk,
                        # a pause, the end of the stream) is the process's own code, resumed right away
                        if x is x0:
                            break
                        heappop(queue)
                        env._now = t
                        ev.callbacks = None
                        if not fresh:
                            del owned[ev]
                            del state[x]
                        x._handback = None
                        if x._run_end() is not None:  # pragma: no cover (a run without a fault)
                            raise AssertionError("a guest run without a fault must not wait")
                        self._resume_at_top(x, ev)
                        steps += 1
                        continue
                    ss = mmu.slot_of(r[9])
                    if ss is None or ss.slot.invalid:
                        break  # MMIO, or RET_PF_RETRY on an INVALID slot
                    # a guest run begun the plain way: plan from its fault on if the plan finds that fault
                    tried = (p is None or p.step == "idle") and not self._skip_left(x)
                    p = self._replan(x) if tried else None
                    if p is not None and p.fpos[0] == r[6] and p.gfns[0] == r[9]:
                        p.k = 1
                        p.step = "run"
                        if len(p.fpos) < _PLAN_MIN:
                            # few faults ahead: take these, and plan again later (as Cohort._begin does)
                            self._back_off(x, True)
                    else:
                        if tried:
                            # nothing to plan here, or a plan that does not start at this fault: plan again
                            # later (Cohort._begin)
                            self._back_off(x, p is not None or self._hits_only)
                        p = None
                        if self._clashes(r[9]):
                            break
            elif p is None or p.step != "pending":
                p = None
                if self._clashes(ctx[1][1] if kind == "host" else ctx[1]):
                    break
            # take it, as Environment.step would: the clock, the event processed, the vCPU's code
            heappop(queue)
            env._now = t
            ev.callbacks = None
            if fresh:
                x._handback = None
            else:
                del owned[ev]
            if p is not None:
                if kind == "run":
                    res = self._end_planned(x, p)
                else:
                    x.m.stall_ns += t - t0
                    x.m.time["host"] += t - t0
                    if kind == "host":
                        res = self._acquire_planned(x, p, ctx[1])
                    else:
                        self._locked_planned(x, p, ctx, ev._value)
                        res = None
            else:
                if self._lat or self._stall_lat:
                    self._flush_records()  # the plain path records in order
                if kind == "run":
                    res = x._run_end()
                else:
                    x.m.stall_ns += t - t0
                    x.m.time["host"] += t - t0
                    if kind == "host":
                        res = x._fault_acquire(ctx[1])
                    else:
                        x._fault_locked(ctx, ev._value)
                        res = None
            steps += 1
            if res is None:
                # the top of Vcpu.run's loop: nothing pending (checked above), the next guest run begins
                nev = Event(env)
                nev._ok, nev._value = True, None
                delay = self._begin(x)
                heappush(queue, (env._now + delay, NORMAL, next(eid), nev))
                owned[nev] = x
                state[x] = ("run", None, None, nev)
            else:
                nev, nctx = res
                owned[nev] = x
                state[x] = ("host" if nctx[0] == "host" else "lock", env._now, nctx, nev)
        self._flush(final=True)
        self._active = False
        # hand every vCPU back to its process, waiting on its pending event in the state it is in
        for x, (kind, t0, ctx, ev) in state.items():
            x._handback = (kind, t0, ctx)
            x._wait, x._wait_ctx = ev, None
            if x is not x0:
                ev.callbacks.append(x.proc._resume)
                x.proc._target = ev
        self.steps += steps
        if steps > len(state):
            self._misses = 0
            self.runs += 1
        else:
            self._missed()
        return state[x0][3]


__all__ = ["Cohort"]
