"""Output paths: checked before any work, written atomically, never half-written.

Every path desim writes to (``--out DIR``, ``--store DIR``, ``--plot FILE``,
``calibrate --out FILE``, ...) is checked by :func:`check_output_dir` or
:func:`check_output_file` before a command starts its work, so a bad path
costs a second, not a whole run, and gives one line naming the flag:

* an empty path is refused (``--out ""`` would otherwise write nowhere);
* the path must not exist as the wrong kind (a file where a directory is
  wanted, or the reverse);
* the nearest existing ancestor must be a directory in which this process can
  create entries (probed by creating and removing a temporary directory there,
  so ``/proc/x`` and read-only mounts fail now rather than after the run).

Writing: :func:`write_outputs` writes a directory's files into a fresh,
uniquely named temporary directory next to it and renames it into place (one
``rename(2)``, atomic). When the directory already exists (an earlier run, or
another run that finished first), the new files replace the old ones one by
one with ``rename(2)`` while holding an exclusive ``flock`` on the parent
directory, so two runs writing the same ``--out`` at once never collide: the
directory ends up with one run's complete set of files. :func:`write_file`
does the same for a single file. :func:`json_writer` writes strict JSON: a NaN
or infinite number (a ratio with a zero baseline, a CI of one replication) is
written as ``null``.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import DesimInputError


def _nearest_existing(p: Path) -> Path:
    cur = p
    while True:
        try:
            if cur.exists() or cur.is_symlink():
                return cur
        except OSError:
            pass
        if cur.parent == cur:
            return cur
        cur = cur.parent


def _probe_writable(d: Path, flag: str, target: Path) -> None:
    try:
        tmp = tempfile.mkdtemp(prefix=".desim-probe.", dir=d)
    except OSError as e:
        raise DesimInputError(f"{flag} {_shown(target)}: cannot create anything in {_shown(d)} "
                              f"({e.strerror or e})") from None
    os.rmdir(tmp)


def _shown(p: Path | str, limit: int = 120) -> str:
    s = str(p)
    return s if len(s) <= limit else s[:limit] + "..."


def _as_path(path: str | os.PathLike[str] | None, flag: str) -> Path:
    if path is None or os.fspath(path) == "":
        raise DesimInputError(f"{flag}: an empty path names nothing to write; give a path")
    s = os.fspath(path)
    if "\0" in s:
        raise DesimInputError(f"{flag} {s!r}: a path cannot contain a NUL byte")
    return Path(s)


def _check_ancestors(p: Path, flag: str) -> None:
    try:
        anc = _nearest_existing(p.parent if str(p.parent) else Path("."))
        if not anc.is_dir():
            raise DesimInputError(f"{flag} {_shown(p)}: {_shown(anc)} is a file, not a directory")
    except OSError as e:
        raise DesimInputError(f"{flag} {_shown(p)}: {e.strerror or e}") from None
    _probe_writable(anc, flag, p)


def check_output_dir(path: str | os.PathLike[str] | None, flag: str = "--out") -> Path:
    """Check that a directory can be created (or written into) at ``path``; create nothing."""
    p = _as_path(path, flag)
    try:
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise DesimInputError(f"{flag} {_shown(p)}: exists and is not a directory; give a directory")
            _probe_writable(p, flag, p)
            return p
    except OSError as e:  # a name too long, a component that is a file, ...
        raise DesimInputError(f"{flag} {_shown(p)}: {e.strerror or e}") from None
    _check_ancestors(p, flag)
    return p


def check_output_file(path: str | os.PathLike[str] | None, flag: str = "--out",
                      suffixes: tuple[str, ...] | None = None) -> Path:
    """Check that a file can be written at ``path`` (replacing a file that is there); create nothing."""
    p = _as_path(path, flag)
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise DesimInputError(f"{flag} {_shown(p)}: the file name must end in {', '.join(suffixes)}")
    try:
        if p.is_dir():
            raise DesimInputError(f"{flag} {_shown(p)}: is a directory; give a file name")
        if (p.exists() or p.is_symlink()) and not p.is_file():
            raise DesimInputError(f"{flag} {_shown(p)}: exists and is not a regular file")
    except OSError as e:
        raise DesimInputError(f"{flag} {_shown(p)}: {e.strerror or e}") from None
    if not p.parent.is_dir():
        raise DesimInputError(f"{flag} {_shown(p)}: directory {_shown(p.parent)} does not exist")
    _probe_writable(p.parent, flag, p)
    return p


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive flock on ``directory`` (between desim processes writing into it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_outputs(out_dir: str | Path, files: dict[str, Callable[[Path], None]]) -> Path:
    """Write result files atomically: into a unique temporary directory, then renamed into place.

    ``files`` maps a file name to a function writing it to the given path. If
    any writer fails, nothing changes at ``out_dir``. Files of an existing
    ``out_dir`` that are not in ``files`` are kept.
    """
    given = Path(out_dir)
    out = Path(os.path.abspath(given))  # "." and "sub/.." name a directory; rename(2) needs its real name
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name or 'out'}.tmp.", dir=parent))
    try:
        for name, writer in files.items():
            writer(tmp / name)
        with _locked(parent):
            if not out.is_dir():
                try:
                    os.rename(tmp, out)  # atomic
                    return given
                except OSError as e:
                    if e.errno == errno.ENOTDIR:
                        raise DesimInputError(f"{given}: exists and is not a directory") from None
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
            clash = [n for n in files if (out / n).is_dir()]
            if clash:
                raise DesimInputError(f"{given / clash[0]}: is a directory where a result file goes; remove it")
            for name in files:
                os.replace(tmp / name, out / name)
            os.rmdir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return given


def write_file(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Write one file atomically: to a unique temporary name in its directory, then renamed over ``path``."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp" + p.suffix, dir=p.parent if str(p.parent) else ".")
    os.close(fd)
    try:
        writer(Path(tmp))
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return p


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON ``null``), numpy scalars made plain."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "to_dict") and not isinstance(obj, type):
        return strict_json(obj.to_dict())
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():  # numpy scalar
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_text(obj: Any) -> str:
    """Strict JSON text (NaN and infinities as ``null``), keys sorted, indented."""
    return json.dumps(strict_json(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def json_writer(obj: Any) -> Callable[[Path], None]:
    def w(p: Path) -> None:
        p.write_text(json_text(obj))
    return w


def csv_writer(df: Any) -> Callable[[Path], None]:
    """Write ``df`` as CSV with 12 significant digits: sums of float ns carry no noise
    (``2824500.000000462`` is written ``2824500``) and nothing real is lost."""
    def w(p: Path) -> None:
        df.to_csv(p, index=False, float_format="%.12g")
    return w
