"""Parser of KVM's binary statistics (the file behind ``KVM_GET_STATS_FD``).

``KVM_GET_STATS_FD`` on a VM fd or a vCPU fd returns a read-only file
(``Documentation/virt/kvm/api.rst``, section "KVM_GET_STATS_FD"). Its layout,
from ``include/uapi/linux/kvm.h``::

    offset 0            struct kvm_stats_header {
                            __u32 flags;        /* 0 */
                            __u32 name_size;    /* bytes of each name incl. NUL */
                            __u32 num_desc;
                            __u32 id_offset;    /* id string, name_size bytes */
                            __u32 desc_offset;
                            __u32 data_offset;
                        };
    desc_offset         num_desc x struct kvm_stats_desc {
                            __u32 flags;        /* type | unit | base */
                            __s16 exponent;
                            __u16 size;         /* number of __u64 values */
                            __u32 offset;       /* from data_offset */
                            __u32 bucket_size;
                            char  name[name_size];
                        };
    data_offset         the __u64 values, re-read with pread() at every sample

The header, id and descriptors never change for the life of the fd; only the
data block does, so :class:`StatsFile` parses the schema once and
:meth:`StatsFile.read` costs one ``pread``. The pure functions
(:func:`parse_header`, :func:`parse_descriptors`, :func:`parse_values`) work on
bytes and are tested on synthetic input.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

HEADER = struct.Struct("<IIIIII")
DESC_FIXED = struct.Struct("<IhHII")

# flags fields (KVM_STATS_TYPE_*, KVM_STATS_UNIT_*, KVM_STATS_BASE_*)
TYPE_MASK, UNIT_MASK, BASE_MASK = 0xF, 0xF << 4, 0xF << 8
TYPES = {0: "cumulative", 1: "instant", 2: "peak", 3: "linear_hist", 4: "log_hist"}
UNITS = {0: "none", 1: "bytes", 2: "seconds", 3: "cycles", 4: "boolean"}
BASES = {0: "pow10", 1: "pow2"}

Value = int | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StatsHeader:
    """``struct kvm_stats_header``."""

    flags: int
    name_size: int
    num_desc: int
    id_offset: int
    desc_offset: int
    data_offset: int


@dataclass(frozen=True, slots=True)
class StatDesc:
    """``struct kvm_stats_desc`` with its name decoded."""

    name: str
    flags: int
    exponent: int
    size: int
    offset: int
    bucket_size: int

    @property
    def type(self) -> str:
        return TYPES.get(self.flags & TYPE_MASK, f"type{self.flags & TYPE_MASK}")

    @property
    def unit(self) -> str:
        u = (self.flags & UNIT_MASK) >> 4
        return UNITS.get(u, f"unit{u}")

    @property
    def base(self) -> str:
        b = (self.flags & BASE_MASK) >> 8
        return BASES.get(b, f"base{b}")


class StatsFormatError(ValueError):
    """The bytes are not a valid KVM binary stats file."""


def parse_header(buf: bytes) -> StatsHeader:
    """Decode the 24-byte header at the start of ``buf``."""
    if len(buf) < HEADER.size:
        raise StatsFormatError(f"stats header needs {HEADER.size} bytes, got {len(buf)}")
    h = StatsHeader(*HEADER.unpack_from(buf, 0))
    if h.name_size == 0:
        raise StatsFormatError("stats header has name_size 0")
    return h


def parse_id(buf: bytes, header: StatsHeader) -> str:
    """The id string (e.g. ``kvm-1234`` or ``kvm-1234/vcpu-0``)."""
    raw = buf[header.id_offset:header.id_offset + header.name_size]
    if len(raw) < header.name_size:
        raise StatsFormatError("stats id string runs past the end of the buffer")
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def parse_descriptors(buf: bytes, header: StatsHeader) -> list[StatDesc]:
    """Decode ``num_desc`` descriptors of ``16 + name_size`` bytes each."""
    step = DESC_FIXED.size + header.name_size
    end = header.desc_offset + step * header.num_desc
    if len(buf) < end:
        raise StatsFormatError(f"stats descriptors need {end} bytes, got {len(buf)}")
    out: list[StatDesc] = []
    for i in range(header.num_desc):
        at = header.desc_offset + i * step
        flags, exponent, size, offset, bucket = DESC_FIXED.unpack_from(buf, at)
        raw = buf[at + DESC_FIXED.size:at + step]
        name = raw.split(b"\0", 1)[0].decode("ascii", "replace")
        out.append(StatDesc(name, flags, exponent, size, offset, bucket))
    return out


def data_size(descs: list[StatDesc]) -> int:
    """Bytes of the data block that cover every descriptor."""
    return max((d.offset + 8 * d.size for d in descs), default=0)


def parse_values(data: bytes, descs: list[StatDesc]) -> dict[str, Value]:
    """Values by name from the data block: an int, or a tuple for histograms."""
    need = data_size(descs)
    if len(data) < need:
        raise StatsFormatError(f"stats data block needs {need} bytes, got {len(data)}")
    out: dict[str, Value] = {}
    for d in descs:
        vals = struct.unpack_from(f"<{d.size}Q", data, d.offset)
        out[d.name] = vals[0] if d.size == 1 else tuple(vals)
    return out


def parse_stats(buf: bytes) -> tuple[str, list[StatDesc], dict[str, Value]]:
    """Parse a whole stats file held in ``buf``: (id, descriptors, values)."""
    h = parse_header(buf)
    descs = parse_descriptors(buf, h)
    return parse_id(buf, h), descs, parse_values(buf[h.data_offset:], descs)


class StatsFile:
    """An open stats fd: schema parsed once, values re-read by :meth:`read`.

    The fd is owned: :meth:`close` (or the context manager) closes it.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        head = os.pread(fd, HEADER.size, 0)
        self.header = parse_header(head)
        h = self.header
        schema_end = max(h.id_offset + h.name_size,
                         h.desc_offset + (DESC_FIXED.size + h.name_size) * h.num_desc)
        buf = os.pread(fd, schema_end, 0)
        self.id = parse_id(buf, h)
        self.descs = parse_descriptors(buf, h)
        self.by_name = {d.name: d for d in self.descs}
        self._size = data_size(self.descs)

    def read(self) -> dict[str, Value]:
        """Every stat by name, as of now."""
        return parse_values(os.pread(self.fd, self._size, self.header.data_offset), self.descs)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> StatsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scalar(values: dict[str, Value]) -> dict[str, int]:
    """Only the single-valued stats (histograms dropped)."""
    return {k: v for k, v in values.items() if isinstance(v, int)}


def delta(after: dict[str, int], before: dict[str, int], descs: dict[str, StatDesc] | None = None) -> dict[str, int]:
    """``after - before`` per stat (for an instant stat such as ``pages_4k``: its change);
    a peak stat (where ``descs`` says so) keeps ``after``, since its difference means nothing."""
    out: dict[str, int] = {}
    for k, v in after.items():
        kind = descs[k].type if descs and k in descs else "cumulative"
        out[k] = v if kind == "peak" else v - before.get(k, 0)
    return out
