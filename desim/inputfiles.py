"""Reading input files safely: regular files only, size caps, UTF-8, bounded TOML nesting.

Every file desim reads from the user (scenario and profile TOML, QEMU and perf
traces) goes through :func:`open_input` (or :func:`read_text`, which uses it),
so that one policy applies to all of them:

* the path must name a **regular file**: ``/dev/zero``, a FIFO or a directory
  is refused at once instead of being read until memory runs out;
* the file must be at most a **size cap**: :data:`MAX_TOML_BYTES` (4 MiB) for
  TOML, :data:`MAX_TRACE_BYTES` (1 GiB) for traces. The shipped files are a
  few KiB (TOML) and at most a few hundred KiB (traces); a trace of a long
  guest boot is tens of MiB. The cap is checked before reading and again
  while reading, in case the file grows;
* text must be **UTF-8**; an error names the line and column of the first bad byte;
* file names the OS refuses (too long, a component that is not a directory,
  no permission) give one line naming the file.

:func:`parse_toml` parses TOML text and refuses nesting deeper than
:data:`MAX_TOML_DEPTH` levels (no desim file needs more than 5), instead of
recursing until Python's stack gives out.
"""
from __future__ import annotations

import os
import stat
import tomllib
from typing import Any, BinaryIO

from .errors import DesimInputError

MAX_TOML_BYTES = 4 << 20
MAX_TRACE_BYTES = 1 << 30
MAX_TOML_DEPTH = 32


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def open_input(path: str | os.PathLike[str], what: str, max_bytes: int) -> BinaryIO:
    """Open ``path`` for reading in binary mode after checking it is a regular file within the cap.

    ``what`` names the file's role in errors ("scenario file", "trace file").
    The returned file refuses to read past ``max_bytes`` (a file that grows).
    """
    name = os.fspath(path)
    if name == "":
        raise DesimInputError(f"cannot read {what}: an empty path names no file")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; regular files ignore the flag
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DesimInputError(f"{_shown_name(name)}: cannot read {what}: no such file") from None
    except IsADirectoryError:
        raise DesimInputError(f"{_shown_name(name)}: cannot read {what}: it is a directory") from None
    except OSError as e:
        raise DesimInputError(f"{_shown_name(name)}: cannot open {what}: {_why(e)}") from None
    except ValueError:  # a NUL byte in the name
        raise DesimInputError(f"{_shown_name(name)!r}: cannot open {what}: the name contains a NUL byte") from None
    f = os.fdopen(fd, "rb")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        f.close()
        raise DesimInputError(f"{_shown_name(name)}: cannot read {what}: not a regular file (a device, FIFO or directory); "
                              "give a file")
    if st.st_size > max_bytes:
        f.close()
        raise DesimInputError(f"{_shown_name(name)}: cannot read {what}: it is {st.st_size:,} bytes, over the limit of "
                              f"{max_bytes:,} (desim.inputfiles)")
    return _Capped(f, name, what, max_bytes)  # type: ignore[return-value]


def _shown_name(name: str, limit: int = 120) -> str:
    return name if len(name) <= limit else name[:limit] + "..."


class _Capped:
    """A binary reader that raises DesimInputError once more than ``cap`` bytes were read."""

    def __init__(self, raw: BinaryIO, name: str, what: str, cap: int) -> None:
        self._f, self._name, self._what, self._cap, self._n = raw, name, what, cap, 0

    def _count(self, data: bytes) -> bytes:
        self._n += len(data)
        if self._n > self._cap:
            raise DesimInputError(f"{self._name}: {self._what} grew past the limit of {self._cap:,} bytes "
                                  "while being read")
        return data

    def fileno(self) -> int:
        return self._f.fileno()

    def read(self, n: int | None = -1) -> bytes:
        return self._count(self._f.read(n))

    def readline(self, n: int | None = -1) -> bytes:
        return self._count(self._f.readline(n))

    def __iter__(self) -> "_Capped":
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "_Capped":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decode_utf8(data: bytes, name: str) -> str:
    """``data`` as UTF-8 text; an error names the line and column of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DesimInputError(f"{name}:{line}: expected UTF-8 text, got byte 0x{data[e.start]:02x} "
                              f"at column {col}") from None


def read_text(path: str | os.PathLike[str], what: str, max_bytes: int = MAX_TOML_BYTES) -> str:
    """The whole of a regular UTF-8 text file of at most ``max_bytes``."""
    with open_input(path, what, max_bytes) as f:
        try:
            data = f.read()
        except OSError as e:
            raise DesimInputError(f"{os.fspath(path)}: cannot read {what}: {_why(e)}") from None
    return decode_utf8(data, os.fspath(path))


def parse_toml(text: str, where: str) -> dict[str, Any]:
    """Parse TOML; nesting deeper than :data:`MAX_TOML_DEPTH` is refused before parsing."""
    depth = _bracket_depth(text)
    if depth > MAX_TOML_DEPTH:
        raise DesimInputError(f"{where}: not valid input: arrays/tables nested {depth} levels deep "
                              f"(the limit is {MAX_TOML_DEPTH})")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DesimInputError(f"{where}: not valid TOML: {e}") from None
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise DesimInputError(f"{where}: not valid input: nested too deeply") from None


def _bracket_depth(text: str) -> int:
    """An upper bound of the nesting of inline arrays/tables, ignoring brackets inside strings and comments."""
    depth = worst = 0
    quote = ""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quote:
            if len(quote) == 3:
                j = text.find(quote, i)
                i = n if j < 0 else j + 3
                quote = ""
                continue
            if c == "\\" and quote == '"':
                i += 2
                continue
            if c == quote:
                quote = ""
            elif c == "\n" and quote in ('"', "'"):
                quote = ""  # an unterminated string: tomllib reports it
        elif c in "\"'":
            quote = text[i:i + 3] if text[i:i + 3] in ('"""', "'''") else c
            i += len(quote)
            continue
        elif c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        elif c in "[{":
            depth += 1
            worst = max(worst, depth)
        elif c in "]}":
            depth = max(0, depth - 1)
        i += 1
    return worst
