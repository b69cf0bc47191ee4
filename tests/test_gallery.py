"""The gallery on real SQLite files: round trips, concurrent processes, damaged, foreign files."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from engine.core.errors import InputError, UsageError
from engine.identity.gallery import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    Gallery,
    GalleryError,
    Person,
    default_gallery_path,
)

from .conftest import REPO, scaled

DIM = 16


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "gallery.db"


@pytest.fixture
def gallery(path: Path) -> Iterator[Gallery]:
    with Gallery(path) as opened:
        yield opened


def vectors(n: int, seed: int, dim: int = DIM) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def by_name(people: list[Person]) -> dict[str, Person]:
    return {person.name: person for person in people}


def sql(path: Path, statement: str) -> list[tuple[object, ...]]:
    """Run one statement on the file with plain sqlite3 (autocommit)."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        return conn.execute(statement).fetchall()


def test_vectors_round_trip_exactly(gallery: Gallery) -> None:
    faces = vectors(3, seed=1)
    tiny, huge = np.finfo(np.float32).smallest_subnormal, np.finfo(np.float32).max
    faces[0, :4] = np.array([-0.0, tiny, huge, -huge], np.float32)
    voices = vectors(2, seed=2, dim=8)
    gallery.enroll("Ada", model="m1", faces=faces, voices=voices, source="ada.mp4")
    gallery.enroll("Ada", model="m1", faces=faces[0])  # one (dim,) vector adds one row

    (ada,) = gallery.people("m1")
    assert ada.name == "Ada"
    assert ada.faces.dtype == np.float32 and ada.voices.dtype == np.float32
    assert ada.faces.tobytes() == np.concatenate([faces, faces[:1]]).tobytes()  # bit for bit
    assert ada.voices.tobytes() == voices.tobytes()
    assert not ada.faces.flags.writeable


def test_float64_and_int_inputs_are_stored_as_float32(gallery: Gallery) -> None:
    faces = np.random.default_rng(3).standard_normal((2, DIM))
    gallery.enroll("Bo", model="m", faces=faces, voices=[[1, 2, 3]])
    (bo,) = gallery.people("m")
    np.testing.assert_array_equal(bo.faces, faces.astype(np.float32))
    np.testing.assert_array_equal(bo.voices, np.array([[1, 2, 3]], np.float32))


def test_people_filters_by_model_and_sorts_by_name(gallery: Gallery) -> None:
    gallery.enroll("Zoe", model="a", faces=vectors(1, 1))
    gallery.enroll("Ann", model="a", voices=vectors(2, 2, dim=4))
    gallery.enroll("Ann", model="b", faces=vectors(5, 3, dim=32))
    gallery.enroll("Max", model="b", voices=vectors(1, 4, dim=8))

    people_a = gallery.people("a")
    assert [p.name for p in people_a] == ["Ann", "Zoe"]
    ann, zoe = people_a
    assert ann.faces.shape == (0, DIM)  # none of hers, but model a's faces are DIM wide
    assert ann.voices.shape == (2, 4)
    assert zoe.faces.shape == (1, DIM)
    assert zoe.voices.shape == (0, 4)

    people_b = by_name(gallery.people("b"))
    assert sorted(people_b) == ["Ann", "Max"]
    assert people_b["Ann"].faces.shape == (5, 32)
    assert people_b["Max"].faces.shape == (0, 32)
    assert gallery.people("c") == []
    assert gallery.names() == ["Ann", "Max", "Zoe"]


def test_no_vectors_of_a_modality_gives_0_by_0(gallery: Gallery) -> None:
    gallery.enroll("Cy", model="m", faces=vectors(2, 1))
    (cy,) = gallery.people("m")
    assert cy.voices.shape == (0, 0)


def test_survives_close_and_reopen(path: Path) -> None:
    faces = vectors(4, seed=5)
    with Gallery(path) as gallery:
        gallery.enroll("Dee", model="m", faces=faces)
    with Gallery(path, create=False) as gallery:
        (dee,) = gallery.people("m")
    np.testing.assert_array_equal(dee.faces, faces)


def test_file_is_stamped_and_in_wal_mode(path: Path, gallery: Gallery) -> None:
    gallery.enroll("Eve", model="m", faces=vectors(1, 1))
    assert sql(path, "PRAGMA journal_mode") == [("wal",)]
    assert sql(path, "PRAGMA application_id") == [(APPLICATION_ID,)]
    assert sql(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_remove_cascades_to_embeddings(path: Path, gallery: Gallery) -> None:
    gallery.enroll("Fay", model="a", faces=vectors(3, 1), voices=vectors(2, 2))
    gallery.enroll("Fay", model="b", faces=vectors(1, 3))
    gallery.enroll("Gus", model="a", faces=vectors(1, 4))

    assert gallery.remove("  Fay ")
    assert not gallery.remove("Fay")
    assert gallery.names() == ["Gus"]
    assert gallery.people("b") == []
    assert sql(path, "SELECT count(*) FROM embeddings") == [(1,)]


def test_names_are_stripped_and_nfc_normalised(gallery: Gallery) -> None:
    gallery.enroll("  Jose\u0301 ", model="m", faces=vectors(1, 1))
    gallery.enroll("Jos\u00e9", model="m", faces=vectors(1, 2))
    assert gallery.names() == ["Jos\u00e9"]
    (jose,) = gallery.people("m")
    assert jose.faces.shape == (2, DIM)


@pytest.mark.parametrize("name", ["", "   ", "a" * 101, "Ann\nBob", "tab\there", "nul\x00", 7])
def test_bad_names_are_usage_errors(gallery: Gallery, name: object) -> None:
    with pytest.raises(UsageError):
        gallery.enroll(name, model="m", faces=vectors(1, 1))  # type: ignore[arg-type]
    assert gallery.names() == []


def test_longest_name_is_accepted(gallery: Gallery) -> None:
    gallery.enroll("a" * 100, model="m", faces=vectors(1, 1))
    assert gallery.names() == ["a" * 100]


@pytest.mark.parametrize(
    "faces",
    [
        [1.0, float("nan")],
        [[1.0, float("inf")]],
        [1e39, 1.0],  # beyond float32
        np.zeros((2, 2, 2), np.float32),
        np.float32(1.0),
        [[1.0, 2.0], [3.0]],
        ["a", "b"],
        [True, False],
        [1 + 2j, 3j],
        np.zeros((3, 0), np.float32),
    ],
    ids=["nan", "inf", "overflow", "3d", "scalar", "ragged", "text", "bool", "complex", "dim0"],
)
def test_bad_vectors_are_usage_errors(gallery: Gallery, faces: npt.ArrayLike) -> None:
    with pytest.raises(UsageError):
        gallery.enroll("Hal", model="m", faces=faces)
    assert gallery.names() == []


def test_bad_enrolments_store_nothing(gallery: Gallery) -> None:
    with pytest.raises(UsageError, match="at least one"):
        gallery.enroll("Ida", model="m")
    with pytest.raises(UsageError, match="at least one"):
        gallery.enroll("Ida", model="m", faces=np.zeros((0, DIM), np.float32))
    for model in ("", " m", "m "):
        with pytest.raises(UsageError):
            gallery.enroll("Ida", model=model, faces=vectors(1, 1))
    # A good face and a bad voice: the face is not stored either.
    with pytest.raises(UsageError):
        gallery.enroll("Ida", model="m", faces=vectors(1, 1), voices=[float("nan")])
    assert gallery.names() == []


def test_dimension_must_match_the_models_vectors(gallery: Gallery) -> None:
    gallery.enroll("Jo", model="m", faces=vectors(1, 1))
    with pytest.raises(UsageError, match="16-dim face"):
        gallery.enroll("Kim", model="m", faces=vectors(1, 2, dim=DIM + 1), voices=vectors(1, 3))
    assert gallery.names() == ["Jo"]  # the transaction was rolled back: no Kim
    gallery.enroll("Kim", model="other", faces=vectors(1, 2, dim=DIM + 1))  # another model: fine


def test_garbage_file_is_a_gallery_error(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(np.random.default_rng(0).bytes(8192))
    with pytest.raises(GalleryError, match="not a database") as caught:
        Gallery(path)
    assert isinstance(caught.value, InputError)
    assert str(path) in str(caught.value)


def test_truncated_gallery_is_a_gallery_error(path: Path) -> None:
    with Gallery(path) as gallery:
        for index in range(20):
            gallery.enroll(f"p{index}", model="m", faces=vectors(4, index, dim=512))
    data = path.read_bytes()
    assert not path.with_name(path.name + "-wal").exists()  # closing checkpointed everything
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GalleryError, match="corrupt"):
        Gallery(path)


def test_text_file_is_a_gallery_error(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("name,vector\nann,1 2 3\n" * 200)
    with pytest.raises(GalleryError, match="not a database"):
        Gallery(path)


@pytest.mark.parametrize("application_id", [0, 0x12345678])
def test_foreign_sqlite_database_is_refused_untouched(path: Path, application_id: int) -> None:
    path.parent.mkdir(parents=True)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE songs (title TEXT)")
        conn.execute(f"PRAGMA application_id = {application_id}")
    before = path.read_bytes()
    with pytest.raises(GalleryError, match="not a talkscope gallery"):
        Gallery(path)
    assert path.read_bytes() == before
    assert sql(path, "PRAGMA journal_mode") == [("delete",)]


def test_newer_schema_says_to_upgrade(path: Path) -> None:
    with Gallery(path) as gallery:
        gallery.enroll("Lee", model="m", faces=vectors(1, 1))
    sql(path, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(GalleryError, match="upgrade talkscope"):
        Gallery(path)


def test_empty_sqlite_file_is_initialised(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.touch()
    with Gallery(path, create=False) as gallery:
        gallery.enroll("Mo", model="m", faces=vectors(1, 1))
        assert gallery.names() == ["Mo"]


def test_missing_file_without_create(path: Path) -> None:
    with pytest.raises(GalleryError, match="does not exist"):
        Gallery(path, create=False)
    assert not path.exists() and not path.parent.exists()


def test_folder_in_the_way_is_a_gallery_error(path: Path) -> None:
    path.mkdir(parents=True)
    with pytest.raises(GalleryError, match="cannot be opened"):
        Gallery(path)


def test_lock_held_too_long_is_a_retryable_gallery_error(path: Path) -> None:
    with Gallery(path, timeout_s=0.2) as gallery, closing(sqlite3.connect(path)) as other:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(GalleryError, match="locked") as caught:
            gallery.enroll("Ned", model="m", faces=vectors(1, 1))
        assert caught.value.retryable
        assert gallery.names() == []  # readers are not blocked by a writer (WAL)
        other.rollback()
        gallery.enroll("Ned", model="m", faces=vectors(1, 1))
        assert gallery.names() == ["Ned"]


def test_switch_to_wal_waits_for_another_writer(path: Path) -> None:
    # SQLite refuses the switch at once, without its busy handler, while another process holds
    # the write lock; opening must wait for it instead.
    Gallery(path).close()
    sql(path, "PRAGMA journal_mode = DELETE")
    with closing(sqlite3.connect(path, isolation_level=None, check_same_thread=False)) as other:
        other.execute("BEGIN IMMEDIATE")
        release = threading.Timer(0.2, other.execute, args=("COMMIT",))
        release.start()
        try:
            with Gallery(path, timeout_s=scaled(10)) as gallery:
                gallery.enroll("Ola", model="m", faces=vectors(1, 1))
        finally:
            release.join()
    assert sql(path, "PRAGMA journal_mode") == [("wal",)]


def test_closed_gallery_refuses_calls(path: Path) -> None:
    gallery = Gallery(path)
    gallery.close()
    gallery.close()  # idempotent
    with pytest.raises(UsageError, match="closed"):
        gallery.names()


def test_bad_timeout_is_a_usage_error(path: Path) -> None:
    with pytest.raises(UsageError):
        Gallery(path, timeout_s=-1)


def test_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TALKSCOPE_GALLERY", str(tmp_path / "g.db"))
    assert default_gallery_path() == tmp_path / "g.db"
    monkeypatch.delenv("TALKSCOPE_GALLERY")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_gallery_path() == tmp_path / "data" / "talkscope" / "gallery.db"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/data")  # ignored, as XDG says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".local" / "share" / "talkscope" / "gallery.db"
    assert default_gallery_path() == expected


def test_threads_share_one_gallery(gallery: Gallery) -> None:
    def enroll_some(thread: int) -> None:
        for index in range(10):
            gallery.enroll(f"t{thread}-{index}", model="m", faces=vectors(1, index))
            gallery.enroll("shared", model="m", voices=vectors(1, index, dim=4))

    threads = [threading.Thread(target=enroll_some, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(scaled(10))
    assert len(gallery.names()) == 41
    assert by_name(gallery.people("m"))["shared"].voices.shape == (40, 4)


CHILD = """
import sys
import time
import numpy as np
from engine.identity.gallery import Gallery

path, tag = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()  # both processes start enrolling at the same moment
with Gallery(path) as gallery:
    for index in range(40):
        face = np.array([[tag, index, row, 0.5] for row in range(3)], np.float32)
        gallery.enroll(f"p{tag}-{index:02d}", model="m", faces=face, voices=face[:1])
        gallery.enroll("shared", model="m", faces=face[0], source=f"process {tag}")
        time.sleep(0.002)  # a chance for the other one: SQLite's busy wait is polling, not a queue
print("done", flush=True)
"""


def test_two_processes_enrolling_at_once_lose_nothing(path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(tag)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for tag in (1, 2)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline() == "ready\n"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        results = [child.communicate(timeout=scaled(60)) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    for child, (out, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err
        assert out == "done\n"

    with Gallery(path) as gallery:
        people = by_name(gallery.people("m"))
    assert len(people) == 81
    for tag in (1, 2):
        for index in range(40):
            person = people[f"p{tag}-{index:02d}"]
            np.testing.assert_array_equal(person.faces[:, :2], [[tag, index]] * 3)
            np.testing.assert_array_equal(person.voices, person.faces[:1])
    shared = people["shared"].faces
    assert sorted(map(tuple, shared[:, :3].tolist())) == sorted(
        (float(tag), float(index), 0.0) for tag in (1, 2) for index in range(40)
    )
