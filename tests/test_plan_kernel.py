"""desim/plan_kernel.py's compiled twins return exactly what the numpy code of desim.mmu returns.

Random SPTE state bytes (present under the current tag or an old one, host page resident or not, ever
mapped or not), random page-table pages at each level (a PT page without its parents too), slots that
start anywhere in their RAM block, and random access slices (repeats, any order, across chunk bounds).
Each case checks that the compiled path ran, so a fallback to the numpy code cannot pass for it."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from desim import plan_kernel as PK
from desim.memslot import Memslot
from desim.mmu import EVER_MAPPED, HOST_RESIDENT, Mmu


def _same(a, b) -> None:
    assert (a is None) == (b is None)
    if a is None:
        return
    if hasattr(a, "new_tables"):  # an InstallPlan
        for f in ("gfns", "state", "resident", "ever_mapped", "allocated"):
            x, y = getattr(a, f), getattr(b, f)
            assert x.dtype == y.dtype and np.array_equal(x, y), f
        assert list(a.new_tables) == list(b.new_tables)
        for lvl, (shift, nf) in a.new_tables.items():
            assert b.new_tables[lvl][0] == shift and b.new_tables[lvl][1].dtype == nf.dtype
            assert np.array_equal(b.new_tables[lvl][1], nf), lvl
        return
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


@pytest.fixture
def compiled_calls(monkeypatch):
    """How many times each compiled twin ran."""
    n = {"first_misses_win": 0, "prefetch_win": 0, "install_win": 0, "unmapped_win": 0, "_not_in": 0}
    for name in n:
        fn = getattr(PK, name)

        def counted(*a, _fn=fn, _name=name):
            n[_name] += 1
            return _fn(*a)

        monkeypatch.setattr(PK, name, counted)
    return n


def _guest(rng, base_gfn: int, off: int, npages: int, p_tables: float):
    mmu = Mmu(backing="4k")
    ua = (1 << 40) - (off << 12)  # the slot's first page is entry ``off`` of a block starting earlier
    mmu.add_slot(Memslot(id=9, base_gfn=0x7000_0000, npages=off + npages + 64, ua=ua))  # the block
    mmu.remove_slot(9)
    ss = mmu.add_slot(Memslot(id=0, base_gfn=base_gfn, npages=npages, ua=1 << 40))
    assert ss.off == off
    tag = mmu.root_tag
    kinds = np.array([0, tag, tag | EVER_MAPPED, tag | HOST_RESIDENT | EVER_MAPPED, HOST_RESIDENT,
                      HOST_RESIDENT | EVER_MAPPED, (tag + 1) | HOST_RESIDENT | EVER_MAPPED, 2 | HOST_RESIDENT],
                     dtype=np.uint8)
    ss.state[0:npages] = kinds[rng.integers(0, len(kinds), npages)]
    end = base_gfn + npages
    for lvl, shift in ((1, 9), (2, 18), (3, 27)):
        keys = np.arange(base_gfn >> shift, ((end - 1) >> shift) + 1)
        keep = keys[rng.random(len(keys)) < p_tables]
        mmu.pt_tags[lvl].put(keep, tag)
        old = keys[rng.random(len(keys)) < 0.2]
        mmu.pt_tags[lvl].put(old[~np.isin(old, keep)], tag + 1)  # a table of an obsolete root
    return mmu, ss


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1),
       base_gfn=st.sampled_from([0, 3, 511, 1 << 18, (1 << 27) - 700, (1 << 21) - 1000]),
       off=st.sampled_from([0, 5, 65_530]),  # 65,530: the slot's pages cross the block's first chunk
       p_tables=st.sampled_from([0.0, 0.5, 1.0]),
       need_accessed=st.booleans(), sort=st.booleans(), n=st.integers(1, 600))
def test_compiled_twins_match_the_numpy_code(compiled_calls, seed, base_gfn, off, p_tables, need_accessed,
                                             sort, n):
    rng = np.random.default_rng(seed)
    npages = 3000
    mmu, ss = _guest(rng, base_gfn, off, npages, p_tables)
    start = int(rng.integers(0, npages - 64))
    seg = base_gfn + start + rng.integers(0, min(npages - start, 2 * n), n)
    if sort:
        seg = np.sort(seg)
    _same((np.flatnonzero(~mmu.mapped_mask(seg)),), (PK.unmapped(mmu, seg),))
    got, want = PK.first_misses(mmu, seg), mmu.first_misses(seg)
    _same(want, got)
    if want is None:
        return
    fg = want[1]
    present = None
    if rng.random() < 0.5:  # installs planned before these faults (desim/cohort.py's plan extensions)
        near = np.arange(max(base_gfn, int(fg.min()) - 8), min(base_gfn + npages, int(fg.max()) + 9))
        near = near[~np.isin(near, fg)]
        present = near[rng.random(len(near)) < 0.3]
        other = np.concatenate((present, rng.integers(0, 1 << 30, 5)))  # and gfns far away
        _same((~np.isin(fg, other),), (PK.not_in(fg, other),))
        assert compiled_calls["_not_in"]
    _same(mmu.plan_prefetch_4k(ss, fg, need_accessed, present), PK.plan_prefetch_4k(mmu, ss, fg, need_accessed, present))
    _same(mmu.plan_install_4k(ss, fg), PK.plan_install_4k(mmu, ss, fg))
    assert compiled_calls["first_misses_win"] and compiled_calls["prefetch_win"] and compiled_calls["install_win"]
    assert compiled_calls["unmapped_win"]


def test_a_pt_page_under_an_absent_parent_is_no_plan(compiled_calls):
    """:meth:`desim.mmu.Mmu.install`'s shortcut (a present PT page has present parents) would not hold: no plan."""
    rng = np.random.default_rng(1)
    mmu, ss = _guest(rng, 0, 0, 2048, 0.0)
    g = np.array([600, 601, 1500], np.int64)
    mmu.pt_tags[1].put(g[:1] >> 9, mmu.root_tag)  # a PT page whose PD and PDPT pages are not present
    assert mmu.plan_install_4k(ss, g) is None and PK.plan_install_4k(mmu, ss, g) is None
    mmu.pt_tags[2].put(np.array([0]), mmu.root_tag)
    mmu.pt_tags[3].put(np.array([0]), mmu.root_tag)
    _same(mmu.plan_install_4k(ss, g), PK.plan_install_4k(mmu, ss, g))
    assert PK.plan_install_4k(mmu, ss, g).allocated.tolist() == [0, 0, 1]  # 600 and 601 share a PT page
    assert compiled_calls["install_win"] == 3


def test_spread_accesses_take_the_numpy_code(compiled_calls):
    """Accesses spread far wider than they are many are left to the numpy code (a window would be large)."""
    rng = np.random.default_rng(2)
    mmu, ss = _guest(rng, 0, 0, 200_000, 1.0)
    seg = np.array([10, 150_000, 199_999], np.int64)
    _same(mmu.first_misses(seg), PK.first_misses(mmu, seg))
    _same((np.flatnonzero(~mmu.mapped_mask(seg)),), (PK.unmapped(mmu, seg),))
    assert compiled_calls["first_misses_win"] == 0 and compiled_calls["unmapped_win"] == 0
