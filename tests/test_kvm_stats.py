"""The binary stats parser on synthetic bytes (no /dev/kvm needed)."""
from __future__ import annotations

import os
import struct

import pytest

from desim.kvm import stats as S

NAME_SIZE = 48


def build(stats: list[tuple[str, int, list[int]]], id_: str = "kvm-42", name_size: int = NAME_SIZE,
          desc_gap: int = 0) -> bytes:
    """A stats file as KVM lays it out: header, id, descriptors, data.

    ``stats`` holds (name, flags, values); each value is a u64.
    """
    hdr = S.HEADER.size
    id_offset = hdr
    desc_offset = id_offset + name_size + desc_gap
    desc_size = S.DESC_FIXED.size + name_size
    data_offset = desc_offset + desc_size * len(stats)
    out = bytearray(data_offset)
    struct.pack_into("<IIIIII", out, 0, 0, name_size, len(stats), id_offset, desc_offset, data_offset)
    out[id_offset:id_offset + len(id_)] = id_.encode()
    data = bytearray()
    for i, (name, flags, vals) in enumerate(stats):
        at = desc_offset + i * desc_size
        struct.pack_into("<IhHII", out, at, flags, 0, len(vals), len(data), 0)
        out[at + S.DESC_FIXED.size:at + S.DESC_FIXED.size + len(name)] = name.encode()
        data += struct.pack(f"<{len(vals)}Q", *vals)
    return bytes(out + data)


SAMPLE = [
    ("pf_taken", 0x0, [123]),                      # cumulative, none, pow10
    ("pages_4k", 0x1, [4096]),                     # instant
    ("max_mmu_rmap_size", 0x2, [7]),               # peak
    ("halt_poll_success_ns", 0x20, [10**12]),      # cumulative, seconds, exponent 0
    ("halt_wait_hist", 0x4 | 0x20, list(range(32))),  # log histogram of 32 buckets
    ("exits", 0x0, [2**64 - 1]),                   # u64 max survives
]


def test_header_fields():
    buf = build(SAMPLE)
    h = S.parse_header(buf)
    assert (h.flags, h.name_size, h.num_desc, h.id_offset) == (0, NAME_SIZE, len(SAMPLE), 24)
    assert h.desc_offset == 24 + NAME_SIZE
    assert h.data_offset == h.desc_offset + (16 + NAME_SIZE) * len(SAMPLE)


def test_descriptors_and_values():
    buf = build(SAMPLE)
    ident, descs, values = S.parse_stats(buf)
    assert ident == "kvm-42"
    assert [d.name for d in descs] == [s[0] for s in SAMPLE]
    by = {d.name: d for d in descs}
    assert by["pf_taken"].type == "cumulative" and by["pf_taken"].unit == "none" and by["pf_taken"].base == "pow10"
    assert by["pages_4k"].type == "instant"
    assert by["max_mmu_rmap_size"].type == "peak"
    assert by["halt_poll_success_ns"].unit == "seconds"
    assert by["halt_wait_hist"].type == "log_hist" and by["halt_wait_hist"].size == 32
    assert values["pf_taken"] == 123
    assert values["exits"] == 2**64 - 1
    assert values["halt_wait_hist"] == tuple(range(32))
    assert S.scalar(values).keys() == {s[0] for s in SAMPLE} - {"halt_wait_hist"}


def test_offsets_are_honoured_not_assumed():
    # a gap between the id and the descriptors, and a different name size
    buf = build(SAMPLE, name_size=64, desc_gap=40)
    _, descs, values = S.parse_stats(buf)
    assert values["pages_4k"] == 4096 and len(descs) == len(SAMPLE)


def test_truncated_input_is_rejected():
    buf = build(SAMPLE)
    with pytest.raises(S.StatsFormatError):
        S.parse_header(buf[:10])
    h = S.parse_header(buf)
    with pytest.raises(S.StatsFormatError):
        S.parse_descriptors(buf[:h.desc_offset + 20], h)
    with pytest.raises(S.StatsFormatError):
        S.parse_stats(buf[:-8])


def test_zero_name_size_is_rejected():
    with pytest.raises(S.StatsFormatError):
        S.parse_header(struct.pack("<IIIIII", 0, 0, 1, 24, 24, 24))


def test_delta_keeps_peaks():
    descs = {d.name: d for d in S.parse_stats(build(SAMPLE))[1]}
    before = {"pf_taken": 10, "pages_4k": 100, "max_mmu_rmap_size": 3}
    after = {"pf_taken": 15, "pages_4k": 40, "max_mmu_rmap_size": 9}
    assert S.delta(after, before, descs) == {"pf_taken": 5, "pages_4k": -60, "max_mmu_rmap_size": 9}


def test_stats_file_rereads_data(tmp_path):
    path = tmp_path / "stats"
    path.write_bytes(build(SAMPLE))
    fd = os.open(path, os.O_RDONLY)
    with S.StatsFile(fd) as sf:
        assert sf.id == "kvm-42"
        assert sf.read()["pf_taken"] == 123
        # the kernel rewrites the data block in place; the schema stays
        data_at = sf.header.data_offset + sf.by_name["pf_taken"].offset
        with open(path, "r+b") as f:
            f.seek(data_at)
            f.write(struct.pack("<Q", 999))
        assert sf.read()["pf_taken"] == 999
    assert sf.fd == -1
