"""The gallery: an SQLite file of enrolled people and their face and voice embeddings.

Each person has a unique name and any number of face and voice embeddings (float32 vectors).
Every vector is tagged with the model that produced it, and reads return the vectors of one model
only, so that embeddings of different models are never compared.

The file::

    people      id, name UNIQUE, created_s
    embeddings  id, person_id -> people.id ON DELETE CASCADE, modality ('face' | 'voice'),
                model, dim, vector (dim float32, little-endian), source, created_s

``PRAGMA application_id`` marks the file as a talkscope gallery (:data:`APPLICATION_ID`) and
``PRAGMA user_version`` holds :data:`SCHEMA_VERSION`. An empty file is initialised; an SQLite
database of another application, a newer schema, a corrupt file or a file that is not SQLite at
all raise :class:`GalleryError` (CLI exit code 2) and are left untouched.

Concurrency: the file is in WAL mode (readers never wait for a writer) and every write is one
``BEGIN IMMEDIATE`` transaction that waits up to ``timeout_s`` for the write lock, so several
processes (two enrolment jobs, a live server reading) can share one gallery and no enrolment
is lost. A :class:`Gallery` holds one connection, guarded by a lock: its methods may be
called from any thread, one at a time. They block (disk I/O, lock waits): from async code, call
them in a worker thread.
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from engine.core.errors import InputError, UsageError

SCHEMA_VERSION = 1
"""The schema this module writes (``PRAGMA user_version``)."""

APPLICATION_ID = int.from_bytes(b"TkSc", "big")
"""``PRAGMA application_id`` of every talkscope gallery."""

MAX_NAME_CHARS = 100
"""The longest name a person may have, in characters."""

MODALITIES = ("face", "voice")
"""The kinds of embedding a person may have."""

_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
"""Unicode categories refused in names: control characters, surrogates, line breaks."""

_SCHEMA = (
    """
    CREATE TABLE people (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_s REAL NOT NULL
    )
    """,
    """
    CREATE TABLE embeddings (
        id INTEGER PRIMARY KEY,
        person_id INTEGER NOT NULL REFERENCES people (id) ON DELETE CASCADE,
        modality TEXT NOT NULL CHECK (modality IN ('face', 'voice')),
        model TEXT NOT NULL,
        dim INTEGER NOT NULL CHECK (dim > 0),
        vector BLOB NOT NULL CHECK (length(vector) = 4 * dim),
        source TEXT NOT NULL DEFAULT '',
        created_s REAL NOT NULL
    )
    """,
    "CREATE INDEX embeddings_by_model ON embeddings (model, modality)",
    # ON DELETE CASCADE looks embeddings up by person: without this index, a scan per removal.
    "CREATE INDEX embeddings_by_person ON embeddings (person_id)",
)

_WAL_RETRY_S = 0.005
"""Pause between two attempts to switch a new gallery to WAL mode."""

_VECTOR_DTYPE = np.dtype("<f4")
"""How vectors are stored: float32, little-endian whatever the machine."""


class GalleryError(InputError):
    """The gallery file is unusable: corrupt, not a talkscope gallery, too new, or locked."""


@dataclass(frozen=True, eq=False)
class Person:
    """One enrolled person and their embeddings of one model.

    Arrays are read-only. Instances compare by identity (they hold arrays).

    Attributes:
        name: the name the person was enrolled under.
        faces: ``(n, dim)`` face embeddings, in enrolment order. With none, ``(0, dim)`` when the
            gallery has face vectors of this model for someone else, else ``(0, 0)``.
        voices: ``(n, dim)`` voice embeddings, the same way.
    """

    name: str
    faces: npt.NDArray[np.float32]
    voices: npt.NDArray[np.float32]


def default_gallery_path() -> Path:
    """Where the gallery lives when no path is given.

    Returns:
        ``$TALKSCOPE_GALLERY`` when set, else ``$XDG_DATA_HOME/talkscope/gallery.db``, else
        ``~/.local/share/talkscope/gallery.db``. A relative ``$XDG_DATA_HOME`` is ignored, as the
        XDG specification says.
    """
    explicit = os.environ.get("TALKSCOPE_GALLERY", "")
    if explicit:
        return Path(explicit).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME", "")
    base = Path(data_home) if os.path.isabs(data_home) else Path.home() / ".local" / "share"
    return base / "talkscope" / "gallery.db"


class Gallery:
    """The enrolled people of one gallery file.

    Use it as a context manager, or call :meth:`close`. Thread-safe (one call at a time);
    every method blocks.

    Attributes:
        path: the gallery file.
        timeout_s: how long a call waits for another process's write lock before failing.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, timeout_s: float = 10.0, create: bool = True
    ) -> None:
        """Open the gallery, creating or initialising it as needed.

        Opening reads the whole file once (``PRAGMA quick_check``: some 35 ms for 80 MB of
        vectors), so that a damaged gallery is refused here rather than halfway through a job.

        Args:
            path: the gallery file; ``~`` is expanded.
            timeout_s: how long to wait for another process's lock, in seconds.
            create: create the file and its parent folders when missing. When False, a missing
                file raises :class:`GalleryError`.

        Raises:
            GalleryError: the file cannot be created or opened, is not an SQLite database, is
                corrupt, belongs to another application, has a newer schema, or stays locked
                longer than ``timeout_s``.
            UsageError: ``timeout_s`` is negative or not finite.
        """
        if not math.isfinite(timeout_s) or timeout_s < 0:
            raise UsageError(f"gallery timeout must be a finite number >= 0 s, got {timeout_s}")
        self.path = Path(path).expanduser()
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = _open(self.path, timeout_s, create=create)

    def enroll(
        self,
        name: str,
        *,
        model: str,
        faces: npt.ArrayLike = (),
        voices: npt.ArrayLike = (),
        source: str = "",
    ) -> None:
        """Add embeddings to a person, enrolling them first when the name is new.

        All of it is one transaction: either every vector is stored or none is.

        Args:
            name: the person's name; surrounding spaces are removed and the name is NFC
                normalised. 1 to :data:`MAX_NAME_CHARS` characters, no control characters.
            model: the model that produced the vectors (a name such as ``"pins-face-v1"``).
            faces: face embeddings, ``(n, dim)`` or one ``(dim,)``; finite numbers, stored as
                float32.
            voices: voice embeddings, the same way.
            source: where the vectors come from (a file, a stream), kept for the record.

        Raises:
            UsageError: the name, the model or the vectors are invalid, no vector was given, or
                the dimension differs from that of this model's vectors already in the gallery.
            GalleryError: the gallery cannot be written (locked longer than ``timeout_s``,
                read-only, disk full, corrupt).
        """
        name = _clean_name(name)
        _check_model(model)
        if not isinstance(source, str):
            raise UsageError(f"source must be a string, got {type(source).__name__}")
        vectors = {"face": _as_vectors(faces, "faces"), "voice": _as_vectors(voices, "voices")}
        if not any(len(stack) for stack in vectors.values()):
            raise UsageError(f"enroll {name!r}: give at least one face or voice vector")
        created_s = time.time()
        with self._using() as conn, _transaction(conn):
            self._check_dims(conn, model, vectors)
            person_id = _person_id(conn, name, created_s)
            conn.executemany(
                "INSERT INTO embeddings"
                " (person_id, modality, model, dim, vector, source, created_s)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (person_id, modality, model, stack.shape[1], _to_blob(row), source, created_s)
                    for modality, stack in vectors.items()
                    for row in stack
                ],
            )

    def people(self, model: str) -> list[Person]:
        """Everyone with at least one embedding of ``model``, and those embeddings.

        Args:
            model: the model whose vectors to return; vectors of other models are left out.

        Returns:
            The people sorted by name (code point order), each with their vectors of ``model``
            in enrolment order.

        Raises:
            UsageError: ``model`` is not a valid model name.
            GalleryError: the gallery cannot be read.
        """
        _check_model(model)
        with self._using() as conn:
            rows = conn.execute(
                "SELECT p.name, e.modality, e.dim, e.vector"
                " FROM embeddings AS e JOIN people AS p ON p.id = e.person_id"
                " WHERE e.model = ? ORDER BY p.name, e.id",
                (model,),
            ).fetchall()
        return _people_of_rows(rows, self._describe())

    def names(self) -> list[str]:
        """The names of everyone enrolled, whatever their models, sorted (code point order).

        Raises:
            GalleryError: the gallery cannot be read.
        """
        with self._using() as conn:
            rows = conn.execute("SELECT name FROM people ORDER BY name").fetchall()
        return [str(row[0]) for row in rows]

    def remove(self, name: str) -> bool:
        """Remove a person and all their embeddings, of every model.

        Args:
            name: the person's name, cleaned as in :meth:`enroll`.

        Returns:
            True when the person was there, False when there was nobody of that name.

        Raises:
            UsageError: the name is invalid.
            GalleryError: the gallery cannot be written.
        """
        name = _clean_name(name)
        with self._using() as conn, _transaction(conn):
            cursor = conn.execute("DELETE FROM people WHERE name = ?", (name,))
        return cursor.rowcount > 0

    def close(self) -> None:
        """Close the file. Idempotent; any other call afterwards raises :class:`UsageError`."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _using(self) -> Iterator[sqlite3.Connection]:
        """The connection, held under the lock, with SQLite errors translated."""
        with self._lock:
            if self._conn is None:
                raise UsageError(f"{self._describe()} is closed")
            with _translated(self.path, self.timeout_s):
                yield self._conn

    def _check_dims(
        self, conn: sqlite3.Connection, model: str, vectors: dict[str, npt.NDArray[np.float32]]
    ) -> None:
        """Refuse vectors whose dimension differs from the model's vectors already stored."""
        for modality, stack in vectors.items():
            if not len(stack):
                continue
            row = conn.execute(
                "SELECT dim FROM embeddings WHERE model = ? AND modality = ? LIMIT 1",
                (model, modality),
            ).fetchone()
            if row is not None and int(row[0]) != stack.shape[1]:
                raise UsageError(
                    f"model {model!r} gives {row[0]}-dim {modality} vectors in "
                    f"{self._describe()}, got {stack.shape[1]}-dim ones; is the model tag right?"
                )

    def _describe(self) -> str:
        return f"gallery {self.path}"


def _open(path: Path, timeout_s: float, *, create: bool) -> sqlite3.Connection:
    """Connect to the gallery file and make sure it is a usable talkscope gallery."""
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GalleryError(
                f"gallery {path}: cannot create its folder ({exc.strerror}); "
                "pass another --gallery path"
            ) from exc
    elif not path.exists():
        raise GalleryError(
            f"gallery {path} does not exist; enroll someone first or pass another --gallery path"
        )
    # A URI, so that create=False never creates the file even if it vanished meanwhile.
    uri = f"{path.absolute().as_uri()}?mode={'rwc' if create else 'rw'}"
    with _translated(path, timeout_s):
        conn = sqlite3.connect(
            uri, uri=True, timeout=timeout_s, isolation_level=None, check_same_thread=False
        )
    try:
        with _translated(path, timeout_s):
            _prepare(conn, path, timeout_s)
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare(conn: sqlite3.Connection, path: Path, timeout_s: float) -> None:
    """Check the file, initialise it when empty, and switch it to WAL."""
    conn.execute("PRAGMA foreign_keys = ON")
    if _checked_state(conn, path):
        problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise GalleryError(
                f"gallery {path} is corrupt ({'; '.join(problems)}); "
                "restore it from a backup or pass another --gallery path"
            )
    else:
        # Two processes may find the same empty file: look again under the write lock.
        with _transaction(conn):
            if not _checked_state(conn, path):
                _initialise(conn)
    _use_wal(conn, timeout_s)


def _use_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Switch the file to WAL mode (it stays so) unless it already is.

    Where WAL is impossible (some network file systems) SQLite keeps its rollback journal:
    slower, but as safe with ``BEGIN IMMEDIATE`` and the busy timeout.
    """
    deadline_s = time.monotonic() + timeout_s
    while conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            # The switch needs the file to itself. While another process holds the write lock,
            # waiting could deadlock (it waits for our read lock to go), so SQLite refuses at
            # once instead of calling the busy handler: let go, then retry.
            if _primary_code(exc) != sqlite3.SQLITE_BUSY or time.monotonic() > deadline_s:
                raise
        time.sleep(_WAL_RETRY_S)


def _checked_state(conn: sqlite3.Connection, path: Path) -> bool:
    """Whether the file holds a gallery of our schema (True) or is empty (False).

    Raises:
        GalleryError: the file is another application's database or has another schema.
    """
    # One statement, so one snapshot: read one by one, the three could straddle the commit of
    # another process initialising the file (no stamp yet, then its tables: "foreign").
    row = conn.execute(
        "SELECT a.application_id, v.user_version, (SELECT count(*) FROM sqlite_master)"
        " FROM pragma_application_id AS a, pragma_user_version AS v"
    ).fetchone()
    application_id, user_version, tables = (int(value) for value in row)
    if application_id not in (0, APPLICATION_ID) or (application_id == 0 and tables):
        raise GalleryError(
            f"{path} is not a talkscope gallery (it is an SQLite database of another "
            "application); pass another --gallery path"
        )
    if application_id == 0:
        return False
    if user_version > SCHEMA_VERSION:
        raise GalleryError(
            f"gallery {path} has schema version {user_version}, newer than this talkscope's "
            f"({SCHEMA_VERSION}); upgrade talkscope to use it"
        )
    if user_version != SCHEMA_VERSION:
        raise GalleryError(
            f"gallery {path} has schema version {user_version}, which this talkscope cannot "
            "read; pass another --gallery path"
        )
    return True


def _initialise(conn: sqlite3.Connection) -> None:
    """Create the tables and stamp the file, inside the caller's transaction."""
    for statement in _SCHEMA:
        conn.execute(statement)
    # Both pragmas write the file header, in the same transaction as the tables.
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: committed at the end, rolled back on any exception.

    ``BEGIN IMMEDIATE`` takes the write lock at once, waiting for it up to the busy timeout; a
    deferred transaction would read first and could then fail to upgrade to writing without
    waiting, when another process wrote meanwhile.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextmanager
def _translated(path: Path, timeout_s: float) -> Iterator[None]:
    """Turn the SQLite errors of the block into :class:`GalleryError`.

    Misuse of the sqlite3 module (``ProgrammingError``, ``InterfaceError``) is a bug here and
    goes through unchanged.
    """
    try:
        yield
    except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
        raise
    except sqlite3.Error as exc:
        raise _gallery_error(path, timeout_s, exc) from exc


def _gallery_error(path: Path, timeout_s: float, exc: sqlite3.Error) -> GalleryError:
    """The one-line error a person can act on, for an SQLite error on the gallery file."""
    code = _primary_code(exc)
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return GalleryError(
            f"gallery {path} is locked by another process (waited up to {timeout_s:g} s); "
            "try again, or give it a longer timeout",
            retryable=True,
        )
    if code == sqlite3.SQLITE_NOTADB:
        return GalleryError(
            f"gallery {path} is not a database (corrupt, encrypted or another kind of file); "
            "pass another --gallery path"
        )
    if code == sqlite3.SQLITE_CORRUPT:
        return GalleryError(
            f"gallery {path} is corrupt ({exc}); restore it from a backup or pass another "
            "--gallery path"
        )
    if code == sqlite3.SQLITE_CANTOPEN:
        return GalleryError(
            f"gallery {path} cannot be opened ({exc}); check that its folder exists and is "
            "writable, or pass another --gallery path"
        )
    if code == sqlite3.SQLITE_READONLY:
        return GalleryError(
            f"gallery {path} is read-only ({exc}); make it and its folder writable, or pass "
            "another --gallery path"
        )
    if code == sqlite3.SQLITE_FULL:
        return GalleryError(f"gallery {path}: the disk is full; free some space and try again")
    return GalleryError(f"gallery {path}: {exc}; check the file or pass another --gallery path")


def _primary_code(exc: sqlite3.Error) -> int:
    """The primary result code of an SQLite error (SQLITE_BUSY for SQLITE_BUSY_SNAPSHOT)."""
    return int(getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def _person_id(conn: sqlite3.Connection, name: str, created_s: float) -> int:
    """The id of the person of that name, enrolled now if new (inside a transaction)."""
    conn.execute("INSERT OR IGNORE INTO people (name, created_s) VALUES (?, ?)", (name, created_s))
    return int(conn.execute("SELECT id FROM people WHERE name = ?", (name,)).fetchone()[0])


def _people_of_rows(rows: list[Any], where: str) -> list[Person]:
    """Group ``(name, modality, dim, vector)`` rows sorted by name into people."""
    dims: dict[str, int] = {}
    blobs: dict[str, dict[str, list[bytes]]] = {}
    for name, modality, dim, vector in rows:
        if dims.setdefault(modality, int(dim)) != dim:
            raise GalleryError(
                f"{where} holds {modality} vectors of one model with different dimensions "
                f"({dims[modality]} and {dim}); re-enroll with a fresh --gallery path"
            )
        blobs.setdefault(name, {m: [] for m in MODALITIES})[modality].append(vector)
    return [
        Person(
            name=name,
            faces=_stack(by_modality["face"], dims.get("face", 0)),
            voices=_stack(by_modality["voice"], dims.get("voice", 0)),
        )
        for name, by_modality in blobs.items()
    ]


def _stack(vectors: list[bytes], dim: int) -> npt.NDArray[np.float32]:
    """``(len(vectors), dim)`` read-only float32 from stored blobs."""
    array = np.frombuffer(b"".join(vectors), dtype=_VECTOR_DTYPE).astype(np.float32)
    array = array.reshape(len(vectors), dim)
    array.flags.writeable = False
    return array


def _to_blob(vector: npt.NDArray[np.float32]) -> bytes:
    """One vector as stored: float32, little-endian."""
    return vector.astype(_VECTOR_DTYPE, copy=False).tobytes()


def _clean_name(name: str) -> str:
    """The name as stored: stripped and NFC normalised, or :class:`UsageError`."""
    if not isinstance(name, str):
        raise UsageError(f"a name must be a string, got {type(name).__name__}")
    cleaned = unicodedata.normalize("NFC", name).strip()
    if not cleaned:
        raise UsageError("a name must not be empty")
    if len(cleaned) > MAX_NAME_CHARS:
        raise UsageError(
            f"a name has at most {MAX_NAME_CHARS} characters; {cleaned[:20]!r}... has "
            f"{len(cleaned)}"
        )
    if any(unicodedata.category(char) in _FORBIDDEN_CATEGORIES for char in cleaned):
        raise UsageError(f"name {cleaned!r} has a control character or line break; remove it")
    return cleaned


def _check_model(model: str) -> None:
    """Refuse a model tag that is empty, not a string or has surrounding spaces."""
    if not isinstance(model, str) or not model.strip() or model != model.strip():
        raise UsageError(
            f"model must be a non-empty name without surrounding spaces, got {model!r}"
        )


def _as_vectors(values: npt.ArrayLike, what: str) -> npt.NDArray[np.float32]:
    """``(n, dim)`` float32 from one vector or a stack of them (``n`` may be 0).

    Raises:
        UsageError: not real numbers, not 1-D or 2-D, empty vectors, or not finite in float32.
    """
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as exc:  # ragged nested lists, for one
        raise UsageError(f"{what} must be an array of numbers ({exc})") from exc
    if array.ndim not in (1, 2):
        raise UsageError(f"{what} must be one vector (dim,) or (n, dim), got shape {array.shape}")
    if array.size == 0 and (array.ndim == 1 or array.shape[0] == 0):
        return np.zeros((0, 0), dtype=np.float32)
    if array.dtype.kind not in "iuf":
        raise UsageError(f"{what} must be real numbers, got dtype {array.dtype}")
    if array.size == 0:
        raise UsageError(f"{what} must not be empty vectors, got shape {array.shape}")
    with np.errstate(over="ignore"):  # float64 beyond float32's range: inf, refused below
        vectors = array.astype(np.float32).reshape(-1, array.shape[-1])
    if not np.isfinite(vectors).all():
        raise UsageError(f"{what} must be finite (no NaN or inf, within the float32 range)")
    return vectors
