"""The durable record of the object graph: `<run_dir>/state.db`, SQLite in WAL mode.

What it holds:
- `meta`: the schema version, the boot id it was written under
  (`/proc/sys/kernel/random/boot_id`: a run directory kept across a reboot describes nothing
  that still exists) and the id counter, so that ids are never reused across restarts;
- `nodes`: one row per committed object, its spec (never a secret), its record (what its
  driver made in the kernel), refs, holders and what it stands on — written in one
  transaction per batch of graph commits;
- `intents`: one row per kernel side effect in progress (map, attach, mkdir, mount, cgroup,
  spawn, and their undoing), written *before* the effect; its outcome is written after. A
  crash between the two leaves an intent without an outcome, which recovery resolves by
  what the system shows.

Writes never happen under the registry's lock: the graph queues its commits and flushes them
here after releasing it (see `imageapi.graph`); this journal serialises writers with its own
lock, so commits reach the disk in the order they were made.

Tmpfs is the default home (`/var/run`), which is right: mappings and mounts do not survive a
reboot either. `synchronous=NORMAL` with WAL keeps every committed transaction across a
daemon crash (only a power loss can lose the last ones, and that ends every mapping too).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class JournalError(Exception):
    """The record cannot be used; the message says why (kept aside for inspection)."""


@dataclass
class Intent:
    seq: int
    node_id: int
    effect: str
    detail: dict[str, Any]
    outcome: dict[str, Any] | None  # None: the effect may or may not have happened


@dataclass
class Loaded:
    """What a previous run left: its rows, its open intents, and what was wrong, if anything."""

    next_id: int = 1
    nodes: list[dict[str, Any]] = field(default_factory=list)
    intents: list[Intent] = field(default_factory=list)
    problem: str | None = None  # a corrupt, foreign or stale record that was set aside
    fresh: bool = True  # no record was there


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return "unknown"


class CrashPoints:
    """Test-only: SIGKILL ourselves at the N-th intent boundary (IMAGEAPI_TEST_CRASH_AT=N),
    and/or write every boundary's name to a file (IMAGEAPI_TEST_TRACE_INTENTS=path), so a test
    can stop the daemon between any kernel call and its record."""

    def __init__(self, at: int | None, trace: str | None) -> None:
        self.at = at
        self.trace = trace
        self.count = 0
        self.armed = False  # only requests count, not recovery

    @classmethod
    def from_environ(cls) -> CrashPoints:
        at = os.environ.get("IMAGEAPI_TEST_CRASH_AT")
        return cls(int(at) if at else None, os.environ.get("IMAGEAPI_TEST_TRACE_INTENTS"))

    def passed(self, name: str) -> None:
        if not self.armed:
            return
        self.count += 1
        if self.trace:
            with open(self.trace, "a") as f:
                f.write(f"{self.count} {name}\n")
        if self.at is not None and self.count == self.at:
            log.warning("test crash point %d (%s): SIGKILL", self.count, name)
            os.kill(os.getpid(), 9)


class Journal:
    def __init__(self, path: Path, crash: CrashPoints | None = None) -> None:
        self.path = path
        self.crash = crash or CrashPoints(None, None)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self.writes = 0

    # -- opening ------------------------------------------------------------------------------

    def open(self) -> Loaded:
        """Open (or create) the record and load it. A record that cannot be read, is of another
        schema or of another boot is renamed `state.db.<why>-<time>` and a fresh one begun; the
        caller is told why (`Loaded.problem`), so recovery can clean what the system shows."""
        loaded = Loaded()
        if self.path.exists():
            try:
                loaded = self._load_existing()
            except sqlite3.OperationalError as exc:
                # Locked, or no space for its -shm file: the record may be fine. Setting it
                # aside would make recovery "clean" a node that runs; refuse to start instead.
                raise OSError(errno.EIO, f"the state database cannot be read now: {exc}",
                              str(self.path)) from exc
            except (sqlite3.DatabaseError, JournalError, ValueError, KeyError) as exc:
                kept = self._set_aside("corrupt" if not isinstance(exc, JournalError)
                                       else exc.args[1])
                loaded = Loaded(problem=f"{exc.args[0] if isinstance(exc, JournalError) else exc}"
                                f"; kept as {kept}")
        if self._db is None:
            self._db = self._connect()
            self._create_schema()
        return loaded

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=5.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        os.chmod(self.path, 0o600)
        return db

    def _create_schema(self) -> None:
        assert self._db is not None
        with self._transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            db.execute("CREATE TABLE IF NOT EXISTS nodes (id INTEGER PRIMARY KEY, row TEXT)")
            db.execute("CREATE TABLE IF NOT EXISTS intents (seq INTEGER PRIMARY KEY "
                       "AUTOINCREMENT, node_id INTEGER, effect TEXT, detail TEXT, outcome TEXT)")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('boot_id', ?)", (boot_id(),))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('next_id', '1')")

    def _load_existing(self) -> Loaded:
        db = self._connect()
        try:
            check = db.execute("PRAGMA quick_check").fetchone()
            if not check or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check[0] if check else '?'}")
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("schema") != str(SCHEMA_VERSION):
                raise JournalError(f"the record is of schema {meta.get('schema')!r}, "
                                   f"not {SCHEMA_VERSION}", "schema")
            if meta.get("boot_id") != boot_id():
                raise JournalError("the record was written before this machine last booted: "
                                   "nothing it describes exists any more", "stale")
            loaded = Loaded(next_id=int(meta["next_id"]), fresh=False)
            for (row,) in db.execute("SELECT row FROM nodes ORDER BY id"):
                loaded.nodes.append(json.loads(row))
            for seq, node_id, effect, detail, outcome in db.execute(
                "SELECT seq, node_id, effect, detail, outcome FROM intents ORDER BY seq"
            ):
                loaded.intents.append(Intent(seq, node_id, effect, json.loads(detail),
                                             json.loads(outcome) if outcome else None))
        except BaseException:
            db.close()
            raise
        self._db = db
        return loaded

    def _set_aside(self, why: str) -> Path:
        if self._db is not None:
            self._db.close()
            self._db = None
        kept = self.path.with_name(f"{self.path.name}.{why}-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                src.rename(f"{kept}{suffix}")
        log.error("the state database %s could not be used; kept as %s", self.path, kept)
        return kept

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- writing ------------------------------------------------------------------------------

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
            if kind is not None:
                self.db.execute("ROLLBACK")
                return
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error:
                # A failed COMMIT (a full disk) leaves the transaction open: end it, or every
                # later BEGIN fails too.
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
                raise

    def _transaction(self) -> Journal._Tx:
        assert self._db is not None
        return Journal._Tx(self._db)

    def write(self, rows: list[tuple[int, dict[str, Any] | None]], next_id: int) -> None:
        """One transaction: each (id, row) replaces the object's row, (id, None) removes it and
        its intents; a committed object's intents are done with (its row says what exists)."""
        with self._lock, self._transaction() as db:
            for node_id, row in rows:
                if row is None:
                    db.execute("DELETE FROM nodes WHERE id = ?", (node_id,))
                else:
                    db.execute("INSERT OR REPLACE INTO nodes VALUES (?, ?)",
                               (node_id, json.dumps(row, sort_keys=True)))
                db.execute("DELETE FROM intents WHERE node_id = ?", (node_id,))
            db.execute("UPDATE meta SET value = ? WHERE key = 'next_id'", (str(next_id),))
            self.writes += 1

    def reserve(self, next_id: int) -> None:
        """Record the id counter before an id is handed out: never reused, even after a crash."""
        with self._lock, self._transaction() as db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'next_id'", (str(next_id),))

    def intent(self, node_id: int, effect: str, detail: dict[str, Any]) -> int:
        """Before a kernel side effect of object `node_id`: say what is about to happen."""
        self.crash.passed(f"{effect}:before")
        with self._lock, self._transaction() as db:
            cur = db.execute("INSERT INTO intents (node_id, effect, detail) VALUES (?, ?, ?)",
                             (node_id, effect, json.dumps(detail, sort_keys=True)))
            seq = cur.lastrowid
        assert seq is not None
        return seq

    def outcome(self, seq: int, result: dict[str, Any], effect: str = "") -> None:
        """After the effect: what it made (a device number, a pid)."""
        with self._lock, self._transaction() as db:
            db.execute("UPDATE intents SET outcome = ? WHERE seq = ?",
                       (json.dumps(result, sort_keys=True), seq))
        self.crash.passed(f"{effect}:after")

    def forget(self, seqs: list[int]) -> None:
        with self._lock, self._transaction() as db:
            db.executemany("DELETE FROM intents WHERE seq = ?", [(s,) for s in seqs])

    def forget_node(self, node_id: int) -> None:
        """A build that failed and undid its own work: its steps describe nothing any more."""
        with self._lock, self._transaction() as db:
            db.execute("DELETE FROM intents WHERE node_id = ?", (node_id,))


class NoJournal(Journal):
    """No durable record (`--no-state`, for benchmarks): a restart forgets everything."""

    def __init__(self) -> None:
        super().__init__(Path("/dev/null"))

    def open(self) -> Loaded:
        return Loaded()

    def write(self, rows: list[tuple[int, dict[str, Any] | None]], next_id: int) -> None:
        pass

    def reserve(self, next_id: int) -> None:
        pass

    def intent(self, node_id: int, effect: str, detail: dict[str, Any]) -> int:
        self.crash.passed(f"{effect}:before")
        return 0

    def outcome(self, seq: int, result: dict[str, Any], effect: str = "") -> None:
        self.crash.passed(f"{effect}:after")

    def forget(self, seqs: list[int]) -> None:
        pass

    def forget_node(self, node_id: int) -> None:
        pass
