"""The chunked byte store behaves as a plain numpy array (property test) and allocates only what is
written; SPTE state follows the mappings: a huge-page guest holds bytes per huge page, not per 4 KiB."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from desim.chunked import ChunkedBytes, SparseBytes
from desim.mmu import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, Mmu
from desim.memslot import Memslot

GiB = 1 << 30
N = 300

ops = st.one_of(
    st.tuples(st.just("set"), st.integers(0, N - 1), st.integers(0, 255)),
    st.tuples(st.just("or"), st.integers(0, N - 1), st.integers(0, 255)),
    st.tuples(st.just("and"), st.integers(0, N - 1), st.integers(0, 255)),
    st.tuples(st.just("range"), st.integers(0, N), st.integers(0, N), st.integers(0, 255), st.integers(0, 255)),
    st.tuples(st.just("all"), st.integers(0, 255), st.integers(0, 255)),
)


@settings(max_examples=80, deadline=None)
@given(st.lists(ops, max_size=40), st.integers(0, 255), st.lists(st.integers(0, N - 1), min_size=1, max_size=50))
def test_chunked_bytes_behave_as_a_dense_array(seq, fill, idx):
    c = ChunkedBytes(N, 5, fill)
    ref = np.full(N, fill, np.uint8)
    for op in seq:
        if op[0] == "set":
            c.set(op[1], op[2])
            ref[op[1]] = op[2]
        elif op[0] == "or":
            c.or_(op[1], op[2])
            ref[op[1]] |= op[2]
        elif op[0] == "and":
            c.and_(op[1], op[2])
            ref[op[1]] &= op[2]
        elif op[0] == "range":
            lo, hi = sorted(op[1:3])
            c.update_range(lo, hi, op[3], op[4])
            ref[lo:hi] = (ref[lo:hi] & op[3]) | op[4]
        else:
            c.update_all(op[1], op[2])
            ref[:] = (ref & op[1]) | op[2]
    assert np.array_equal(c.to_array(), ref)
    i = np.array(idx)
    assert np.array_equal(c.take(i), ref[i])
    assert all(c.get(int(k)) == ref[k] for k in i)
    lo, hi = min(idx), max(idx) + 1
    assert c.count_masked(lo, hi, 0x3F, 5) == int(np.count_nonzero((ref[lo:hi] & 0x3F) == 5))


def test_only_written_chunks_are_allocated():
    c = ChunkedBytes(1 << 30, 16)
    assert c.nbytes == 16 * (1 << 14)  # the chunk lists only
    c.set(123_456_789, 7)
    c.set(5, 0)  # writing the fill value allocates nothing
    c.update_range(0, 1 << 30, 0x3F)  # clearing bits the fill does not have allocates nothing
    assert len(c.live) == 1 and c.get(123_456_789) == 7 and c.count_masked(0, 1 << 30, 0xFF, 7) == 1


def _guest(backing: str, size: int) -> tuple[Mmu, object]:
    mmu = Mmu(backing=backing)
    ss = mmu.add_slot(Memslot(id=0, base_gfn=0, npages=size >> 12, ua=1 << 40))
    return mmu, ss


def test_a_1g_backed_guest_holds_state_per_mapping_not_per_page():
    mmu, ss = _guest("hugetlbfs-1g", 64 * GiB)
    for g in range(0, (64 * GiB) >> 12, 1 << 18):
        assert mmu.host_level(ss, g) == PG_LEVEL_1G
        mmu.make_resident(ss, g, PG_LEVEL_1G)
        mmu.install(ss, g, PG_LEVEL_1G)
    assert mmu.is_mapped(12345) and mmu.ever_mapped(ss, 12345)
    assert mmu.slot_leaf_counts(ss) == {PG_LEVEL_4K: 0, PG_LEVEL_2M: 0, PG_LEVEL_1G: 64}
    # 64 GiB on 4 KiB pages would be 16 MiB of state; on 1 GiB pages it is a few KiB
    assert mmu.memory_bytes() < 16_384 and not ss.block.state.live
    # a 4 KiB split (dirty logging, an NX split) allocates one chunk of the 4 KiB level, not the slot's
    mmu.zap_slot_huge_leafs(ss)
    assert not mmu.is_mapped(12345) and mmu.ever_mapped(ss, 12345)  # a re-fault, not a first touch
    mmu.install(ss, 12345, PG_LEVEL_4K)
    assert mmu.is_mapped(12345) and len(ss.block.state.live) == 1


def test_4k_state_is_one_byte_per_page_when_everything_is_mapped():
    mmu, ss = _guest("4k", GiB)
    npages = GiB >> 12
    for g in range(npages):
        mmu.install(ss, g, PG_LEVEL_4K)
    assert mmu.present_leaf == npages and mmu.mapped_mask(np.arange(npages)).all()
    assert mmu.memory_bytes() <= npages * 1.001


def test_a_slot_view_reads_and_writes_through_like_an_array():
    mmu, ss = _guest("4k", 1 << 30)
    view = ss.state
    idx = np.array([0, 1, 70_000, 262_143])
    view[idx] = np.array([1, 2, 3, 4], np.uint8)
    view[5] = 9
    view[10:13] = 7
    assert view[idx].tolist() == [1, 2, 3, 4] and view[5] == 9 and view[10:14].tolist() == [7, 7, 7, 0]
    assert np.asarray(view).sum() == 1 + 2 + 3 + 4 + 9 + 21 and len(view) == 262_144
    mmu.remove_slot(0)  # QEMU re-creates a slot over part of the same RAM block: same state, an offset
    other = mmu.add_slot(Memslot(id=1, base_gfn=1 << 20, npages=16, ua=(1 << 40) + (4 << 12)))
    assert other.block is ss.block and other.off == 4 and other.state[0:3].tolist() == [0, 9, 0]


sparse_ops = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 1 << 40), st.integers(0, 63)),
    st.tuples(st.just("del"), st.integers(0, 1 << 40)),
    st.tuples(st.just("put"), st.lists(st.integers(0, 1 << 20), max_size=20), st.integers(0, 63)),
    st.tuples(st.just("clear")),
)


@settings(max_examples=80, deadline=None)
@given(st.lists(sparse_ops, max_size=40), st.integers(0, 63), st.integers(0, 1 << 21), st.integers(0, 1 << 21))
def test_sparse_bytes_behave_as_a_dict_of_region_tags(seq, value, lo, hi):
    """The page-table tags (Mmu.pt_tags): a dict of key -> tag (0 = none), by key or by key array."""
    s = SparseBytes(shift=6)
    ref: dict[int, int] = {}
    for op in seq:
        if op[0] == "set":
            s[op[1]] = op[2]
            ref[op[1]] = op[2]
        elif op[0] == "del":
            del s[op[1]]
            ref.pop(op[1], None)
        elif op[0] == "put":
            s.put(np.array(op[1], dtype=np.int64), op[2])
            ref.update(dict.fromkeys(op[1], op[2]))
        else:
            s.clear()
            ref.clear()
    keys = sorted(ref) + [lo, hi]
    assert [s.get(k) for k in keys] == [ref.get(k, 0) for k in keys]
    assert s.take(np.array(keys, dtype=np.int64)).tolist() == [ref.get(k, 0) for k in keys]
    want = sorted(k for k, t in ref.items() if t == value and lo <= k <= hi) if value else []
    assert s.find(value, lo, hi).tolist() == want
    assert s.nbytes <= 64 * (len({k >> 6 for k in ref}) + len(seq))
