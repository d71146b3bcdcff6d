"""The result store: every finished task of every sweep, in one SQLite database in WAL mode.

A *task* (one replication of one policy on one scenario point) is stored under
its key, a hash of (model fingerprint, fully resolved scenario and host
profile, the contents of the recordings and traces it reads, policy, seed,
replication, extras tag) computed by
:meth:`desim.sweep.Task.key`. ``--store DIR`` means the file
``DIR/results.sqlite`` (a path ending in ``.sqlite`` is used as it is).

Why SQLite in WAL mode rather than a Parquet dataset written in row groups:

* **crash safety**: each batch of finished results is one transaction; a
  SIGKILL at any moment leaves every row either whole or absent (the WAL is
  replayed or discarded by the next open), and the primary key on the task key
  turns a second insert of the same task into a no-op, so no row is ever
  duplicated. A Parquet file is only readable once its footer is written: a
  killed writer loses or corrupts its open file, and deduplication is left to
  the reader.
* **several writers**: two sweeps on the same store serialise their short write
  transactions (a busy timeout waits for the lock) instead of interleaving
  bytes; with Parquet each writer needs its own files and a later compaction.
* **resume is a lookup**: "which of these 100,000 tasks are done?" is a probe
  of the primary-key index, not 100,000 files opened one by one (the per-task
  JSON store this replaces).
* **no new dependency**: ``sqlite3`` is in the standard library, and pandas
  reads the store directly (the ``runs`` table: one row per task)::

      import sqlite3, pandas as pd
      con = sqlite3.connect("DIR/results.sqlite")
      runs = pd.read_sql("SELECT * FROM runs", con)   # one row per task, one column per metric

Limit: keep the store on the driver's local disk (SQLite's locks are not
reliable over NFS). Workers never open it: their results travel back to the
driver, which writes them.

Entries are checked when read: the payload must parse, have the fields of a
run result, and match its checksum (SHA-256 of key and payload), so a damaged
or edited entry is named on stderr, dropped and recomputed, never used.
Stores written by earlier versions (one JSON file per task under
``DIR/xx/KEY.json``) are read too: an entry found there is checked (it has no
checksum: its fields must match the task asking for it) and copied into the
database; :meth:`ResultStore.import_legacy` converts a whole directory.

Tables:

* ``results(key, model_version, scenario, policy, seed, replication, wall_s,
  created, checksum, payload)``: one row per task, ``payload`` the run result
  as zlib-compressed JSON (metrics, per-vCPU rows, kept samples): what a
  resumed sweep reads back, bit for bit;
* ``runs(key, scenario, policy, seed, replication, <one REAL column per
  metric>)``: the same metrics as a wide table for pandas (a metric a run does
  not report, or NaN, is NULL); a new metric name adds a column;
* ``sweep_tasks(sweep, point, labels, policy, seed, replication, key)``: which
  task is which (point, policy, replication) of a named sweep, ``labels`` the
  point's factor values as JSON (a task shared by two sweeps is stored once).
"""
from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import DesimInputError

DB_NAME = "results.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY, model_version TEXT, scenario TEXT, policy TEXT, seed INTEGER,
    replication INTEGER, wall_s REAL, created REAL, checksum TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY, scenario TEXT, policy TEXT, seed INTEGER, replication INTEGER);
CREATE TABLE IF NOT EXISTS sweep_tasks (
    sweep TEXT NOT NULL, point INTEGER NOT NULL, labels TEXT NOT NULL, policy TEXT NOT NULL,
    seed INTEGER NOT NULL, replication INTEGER NOT NULL, key TEXT NOT NULL,
    PRIMARY KEY (sweep, point, policy, seed, replication));
"""
RUNS_FIXED = ("key", "scenario", "policy", "seed", "replication")
_CHUNK = 500  # keys per SELECT ... IN (...) (SQLite's default limit on host parameters is 32766)


def checksum(key: str, payload: str) -> str:
    """SHA-256 of the task key and the payload: binds a stored result to the task it answers."""
    return hashlib.sha256(f"{key}\n{payload}".encode()).hexdigest()


def check_result(r: Any, expect: dict[str, Any] | None = None) -> str | None:
    """Why ``r`` is not a usable run result (None: it is).

    ``expect`` (policy, seed, replication of the task asking) must match too.
    """
    if not isinstance(r, dict):
        return f"not a JSON object but {type(r).__name__}"
    for f, types in (("scenario", str), ("policy", str), ("seed", int), ("replication", int), ("metrics", dict)):
        if f not in r:
            return f"field '{f}' is missing"
        if not isinstance(r[f], types) or isinstance(r[f], bool):
            return f"field '{f}' is {type(r[f]).__name__}, not {types.__name__}"
    for m, v in r["metrics"].items():
        if not (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))):
            return f"metric '{m}' is {type(v).__name__}, not a number"
    for f, v in (expect or {}).items():
        if r.get(f) != v:
            return f"its {f} is {r.get(f)!r}, the task's is {v!r}"
    return None


def _dumps(result: dict[str, Any]) -> str:
    # insertion order kept (the same columns whether fresh or stored); NaN/inf are valid in Python's
    # JSON reader, which is the only one that reads payloads (pandas users read the metrics table)
    return json.dumps(result, separators=(",", ":"))


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def store_path(root: str | Path) -> Path:
    """The database file of a ``--store`` argument (a directory, or a ``.sqlite`` file)."""
    p = Path(root)
    return p if p.suffix in (".sqlite", ".db") else p / DB_NAME


class ResultStore:
    """Finished task results, keyed by task key (see the module docstring)."""

    def __init__(self, root: str | Path, create: bool = True,
                 warn: Callable[[str], None] | None = None) -> None:
        self.path = store_path(root)
        self.root = self.path.parent if self.path.name == DB_NAME else None  # where legacy JSON may live
        if self.path.exists() and self.path.is_dir():
            raise DesimInputError(f"--store {root}: {self.path} is a directory, not a store database")
        if not create and not self.path.is_file():
            raise DesimInputError(f"{root}: no result store there (expected {self.path})")
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise DesimInputError(f"--store {root}: {self.path.parent} is a file, not a directory")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._con = sqlite3.connect(self.path, timeout=120.0, isolation_level=None,
                                        check_same_thread=False)
            self._con.execute("PRAGMA journal_mode=WAL")
            self._con.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses nothing committed
            self._con.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise DesimInputError(f"--store {root}: {self.path} is not a usable SQLite database ({e}); "
                                  f"give another directory") from None
        except OSError as e:
            raise DesimInputError(f"--store {root}: cannot create {self.path.parent} ({e.strerror})") from None
        self.warn = warn or (lambda msg: print(f"desim: {msg}", file=sys.stderr))
        self.damaged: list[str] = []
        self._columns: set[str] | None = None

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------
    def get(self, key: str, expect: dict[str, Any] | None = None) -> dict[str, Any] | None:
        return self.get_many([key], [expect]).get(key)

    def get_many(self, keys: list[str], expects: list[dict[str, Any] | None] | None = None
                 ) -> dict[str, dict[str, Any]]:
        """The valid stored results among ``keys`` (damaged entries are named, deleted, left out)."""
        expect_of = dict(zip(keys, expects)) if expects is not None else {}
        found: dict[str, dict[str, Any]] = {}
        uniq = list(dict.fromkeys(keys))
        for i in range(0, len(uniq), _CHUNK):
            chunk = uniq[i:i + _CHUNK]
            rows = self._con.execute(f"SELECT key, checksum, payload FROM results WHERE key IN "
                                     f"({','.join('?' * len(chunk))})", chunk).fetchall()
            for key, ck, payload in rows:
                r, why = self._decode(key, ck, payload, expect_of.get(key))
                if why is not None:
                    self._drop(key, why)
                else:
                    found[key] = r
        if self.root is not None:
            missing = [k for k in uniq if k not in found]
            legacy = self._legacy_many(missing, expect_of)
            if legacy:
                self.put_many(list(legacy.items()))
                found.update(legacy)
        return found

    def _decode(self, key: str, ck: str, blob: bytes, expect: dict[str, Any] | None
                ) -> tuple[dict[str, Any] | None, str | None]:
        try:
            payload = zlib.decompress(blob).decode()
        except (zlib.error, TypeError, UnicodeDecodeError):
            return None, "its payload is not compressed JSON"
        if checksum(key, payload) != ck:
            return None, "its checksum does not match its content (edited or damaged)"
        try:
            r = json.loads(payload)
        except json.JSONDecodeError as e:
            return None, f"not JSON ({e.msg})"
        why = check_result(r, expect)
        return (r, None) if why is None else (None, why)

    def _drop(self, key: str, why: str) -> None:
        self.damaged.append(key)
        self.warn(f"store {self.path}: entry {key[:16]}... is damaged ({why}): recomputing it")
        with self._transaction():
            self._con.execute("DELETE FROM results WHERE key = ?", (key,))
            self._con.execute("DELETE FROM runs WHERE key = ?", (key,))

    def keys(self) -> set[str]:
        return {k for (k,) in self._con.execute("SELECT key FROM results")}

    def __len__(self) -> int:
        return self._con.execute("SELECT count(*) FROM results").fetchone()[0]

    # -- writing -------------------------------------------------------------------
    def put(self, key: str, result: dict[str, Any]) -> None:
        self.put_many([(key, result)])

    def put_many(self, items: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Store results in one transaction (all or nothing); a key already stored is left as it is."""
        rows = []
        wide: dict[tuple[str, ...], list[tuple]] = {}
        now = time.time()
        for key, r in items:
            payload = _dumps(r)
            rows.append((key, r.get("model_version"), r.get("scenario"), r.get("policy"), r.get("seed"),
                         r.get("replication"), r.get("wall_s"), now, checksum(key, payload),
                         zlib.compress(payload.encode(), 1)))
            ms = {m: v for m, v in r.get("metrics", {}).items() if m not in RUNS_FIXED}
            names = tuple(ms)
            wide.setdefault(names, []).append(
                (key, r.get("scenario"), r.get("policy"), r.get("seed"), r.get("replication"),
                 *(float(v) if v is not None and math.isfinite(v) else None for v in ms.values())))
        if not rows:
            return
        with self._transaction():
            self._con.executemany("INSERT OR IGNORE INTO results VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
            for names, vals in wide.items():
                self._add_columns(names)
                cols = ",".join(_quote(c) for c in RUNS_FIXED + names)
                self._con.executemany(f"INSERT OR IGNORE INTO runs ({cols}) VALUES "
                                      f"({','.join('?' * (len(RUNS_FIXED) + len(names)))})", vals)

    def _add_columns(self, names: tuple[str, ...]) -> None:
        """Give ``runs`` a column per new metric (inside the write transaction: no other writer races us)."""
        if self._columns is None or not set(names) <= self._columns:
            self._columns = {row[1] for row in self._con.execute("PRAGMA table_info(runs)")}
            for n in names:
                if n not in self._columns:
                    self._con.execute(f"ALTER TABLE runs ADD COLUMN {_quote(n)} REAL")
                    self._columns.add(n)

    def record_sweep(self, sweep: str, rows: Iterable[tuple[int, dict[str, Any], str, int, int, str]]) -> None:
        """Name the tasks of a sweep: (point, labels, policy, seed, replication, key) per task."""
        data = [(sweep, p, json.dumps(lab, sort_keys=True, default=str), pol, s, r, k)
                for p, lab, pol, s, r, k in rows]
        with self._transaction():
            self._con.executemany("INSERT OR REPLACE INTO sweep_tasks VALUES (?,?,?,?,?,?,?)", data)

    def sweeps(self) -> list[str]:
        return [s for (s,) in self._con.execute("SELECT DISTINCT sweep FROM sweep_tasks ORDER BY sweep")]

    def sweep_tasks(self, sweep: str) -> list[tuple[int, dict[str, Any], str, int, int, str]]:
        cur = self._con.execute("SELECT point, labels, policy, seed, replication, key FROM sweep_tasks "
                                "WHERE sweep = ? ORDER BY point, policy, seed, replication", (sweep,))
        return [(p, json.loads(lab), pol, s, r, k) for p, lab, pol, s, r, k in cur]

    def all_results(self) -> dict[str, dict[str, Any]]:
        """Every valid stored result (damaged ones named and dropped), by key."""
        out = {}
        for key, ck, payload in self._con.execute("SELECT key, checksum, payload FROM results ORDER BY rowid"
                                                  ).fetchall():
            r, why = self._decode(key, ck, payload, None)
            if why is not None:
                self._drop(key, why)
            else:
                out[key] = r
        return out

    class _Tx:
        def __init__(self, con: sqlite3.Connection) -> None:
            self.con = con

        def __enter__(self) -> None:
            self.con.execute("BEGIN IMMEDIATE")  # take the write lock now (waits up to the busy timeout)

        def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
            self.con.execute("COMMIT" if et is None else "ROLLBACK")

    def _transaction(self) -> "ResultStore._Tx":
        return ResultStore._Tx(self._con)

    # -- the per-task JSON stores of earlier versions ------------------------------------------------
    def _legacy_file(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def _legacy_many(self, keys: list[str], expect_of: dict[str, Any]) -> dict[str, dict[str, Any]]:
        out = {}
        for key in keys:
            p = self._legacy_file(key)
            if not p.exists():
                continue
            r, why = self._read_legacy(p, expect_of.get(key))
            if why is not None:
                self.damaged.append(key)
                self.warn(f"store {self.root}: legacy entry {p} is damaged ({why}): recomputing it")
            else:
                out[key] = r
        return out

    @staticmethod
    def _read_legacy(p: Path, expect: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str | None]:
        if not p.is_file():
            return None, "not a regular file"
        try:
            r = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError) as e:
            return None, f"cannot read: {e}"
        except json.JSONDecodeError as e:
            return None, f"not JSON ({e.msg})"
        why = check_result(r, expect)
        return (r, None) if why is None else (None, why)

    def import_legacy(self) -> tuple[int, int]:
        """Copy every valid legacy JSON entry under the store's directory into the database.

        Returns (entries imported, entries damaged). Legacy files have no checksum:
        only their form is checked here (and their fields against the task when a
        sweep reads them through :meth:`get_many`).
        """
        if self.root is None:
            return 0, 0
        ok, bad = [], 0
        for p in sorted(self.root.glob("[0-9a-f][0-9a-f]/*.json")):
            r, why = self._read_legacy(p, None)
            if why is not None:
                bad += 1
                self.warn(f"store {self.root}: legacy entry {p} is damaged ({why}): skipped")
            else:
                ok.append((p.stem, r))
        self.put_many(ok)
        return len(ok), bad
