"""Migrations against a real PostgreSQL, and the schema's constraints enforced by the server itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from db.migrate import MIGRATIONS_DIR, MigrationError, load_migrations, migrate, pending
from db.store import STATS
from tests.db.samples import drawing_png, one

ROOT = Path(__file__).resolve().parents[2]


def _write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


# -- pure ------------------------------------------------------------------------------------------
def test_load_migrations_in_version_order(tmp_path: Path) -> None:
    _write(tmp_path, {"0002_b.sql": "SELECT 2;", "0001_a.sql": "SELECT 1;", "notes.txt": "ignored"})
    assert [m.filename for m in load_migrations(tmp_path)] == ["0001_a.sql", "0002_b.sql"]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"1_a.sql": ""}, "NNNN_lowercase_name"),
        ({"0001_Add-Table.sql": ""}, "NNNN_lowercase_name"),
        ({"0001_a.sql": "", "0001_b.sql": ""}, "two migrations have version 1"),
    ],
)
def test_load_migrations_rejects_bad_files(tmp_path: Path, files: dict[str, str], message: str) -> None:
    _write(tmp_path, files)
    with pytest.raises(MigrationError, match=message):
        load_migrations(tmp_path)


def test_pending_detects_changed_and_unknown(tmp_path: Path) -> None:
    migrations = load_migrations(_write(tmp_path, {"0001_a.sql": "SELECT 1;", "0002_b.sql": "SELECT 2;"}))
    first = migrations[0]
    assert pending(migrations, {1: ("a", first.checksum)}) == migrations[1:]
    with pytest.raises(MigrationError, match=r"0001_a\.sql was changed"):
        pending(migrations, {1: ("a", "0" * 64)})
    with pytest.raises(MigrationError, match="0007_gone"):
        pending(migrations, {7: ("gone", "0" * 64)})


# -- against the server ------------------------------------------------------------------------------
def test_migrate_from_empty_then_idempotent(empty_db_url: str) -> None:
    names = [m.filename for m in load_migrations()]
    assert migrate(empty_db_url) == names
    assert migrate(empty_db_url) == []
    with psycopg.connect(empty_db_url) as conn:
        rows = conn.execute("SELECT version, name, checksum, applied_at FROM schema_migrations").fetchall()
        assert [f"{v:04d}_{n}.sql" for v, n, _, _ in rows] == names
        assert all(len(checksum) == 64 and applied for _, _, checksum, applied in rows)
        assert conn.execute("SELECT count(*) FROM predictions").fetchone() == (0,)


def test_0002_moves_existing_drawings(empty_db_url: str, tmp_path: Path) -> None:
    first = tmp_path / "first"
    first.mkdir()
    shutil.copy(MIGRATIONS_DIR / "0001_predictions.sql", first)
    assert migrate(empty_db_url, first) == ["0001_predictions.sql"]
    png = drawing_png(7)
    with psycopg.connect(empty_db_url) as conn:
        (pid,) = one(
            conn.execute(
                "INSERT INTO predictions (digit, confidence, probabilities, model_name, model_version, "
                "latency_ms, image_png, input_pixels, true_label, labelled_at) "
                "VALUES (7, 0.5, %s, 'mnist', 'old', 3, %s, %s, 1, now()) RETURNING id",
                ([0.1] * 10, png, bytes(range(256)) * 3 + bytes(16)),
            )
        )
    assert migrate(empty_db_url)[0] == "0002_prediction_images.sql"
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute(
            "SELECT digit, true_label, image_png, input_pixels FROM predictions "
            "JOIN prediction_images ON prediction_id = id WHERE id = %s",
            (pid,),
        ).fetchone() == (7, 1, png, bytes(range(256)) * 3 + bytes(16))


def test_two_concurrent_runs_apply_each_file_once(empty_db_url: str, tmp_path: Path) -> None:
    # A slow first migration keeps the lock long enough for the second run to really wait on it.
    directory = _write(
        tmp_path,
        {
            "0001_slow.sql": "SELECT pg_sleep(0.5); CREATE TABLE t (id int);",
            "0002_more.sql": "ALTER TABLE t ADD COLUMN x int;",
        },
    )
    barrier = threading.Barrier(2)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(migrate(empty_db_url, directory))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(results, key=len) == [[], ["0001_slow.sql", "0002_more.sql"]]
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (2,)


def test_changed_migration_is_an_error(empty_db_url: str, tmp_path: Path) -> None:
    directory = _write(tmp_path, {"0001_a.sql": "CREATE TABLE a (id int);"})
    assert migrate(empty_db_url, directory) == ["0001_a.sql"]
    _write(directory, {"0001_a.sql": "CREATE TABLE a (id bigint);", "0002_b.sql": "CREATE TABLE b ();"})
    with pytest.raises(MigrationError, match=r"0001_a\.sql was changed after it was applied"):
        migrate(empty_db_url, directory)
    with psycopg.connect(empty_db_url) as conn:  # nothing else was applied
        assert conn.execute("SELECT to_regclass('b')").fetchone() == (None,)


def test_failing_migration_rolls_back_and_is_not_recorded(empty_db_url: str, tmp_path: Path) -> None:
    directory = _write(
        tmp_path, {"0001_a.sql": "CREATE TABLE a (id int);", "0002_bad.sql": "CREATE TABLE b (); SELECT 1/0;"}
    )
    with pytest.raises(psycopg.errors.DivisionByZero):
        migrate(empty_db_url, directory)
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT version FROM schema_migrations").fetchall() == [(1,)]
        assert conn.execute("SELECT to_regclass('b')").fetchone() == (None,)
    (directory / "0002_bad.sql").write_text("CREATE TABLE b ();")
    assert migrate(empty_db_url, directory) == ["0002_bad.sql"]


def test_command_line(empty_db_url: str, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "db", "migrate", "--database-url", empty_db_url]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "applied: 0001_predictions.sql, 0002_prediction_images.sql, 0003" in first.stdout
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing to apply" in again.stdout


def test_the_former_command_still_works(empty_db_url: str) -> None:
    cmd = [sys.executable, "-m", "db.migrate", "--url", empty_db_url]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "applied: 0001_predictions.sql" in first.stdout and "0004_prediction_key.sql" in first.stdout


def test_command_line_takes_database_url_from_the_environment(empty_db_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": empty_db_url}
    result = subprocess.run(
        [sys.executable, "-m", "db", "migrate"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "0004_prediction_key.sql" in result.stdout


def test_command_line_reports_an_unreachable_server(tmp_path: Path) -> None:
    url = f"postgresql://postgres@/postgres?host={tmp_path}&port=5999&connect_timeout=2"  # no server there
    result = subprocess.run(
        [sys.executable, "-m", "db", "migrate", "--database-url", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "migration failed: database unavailable" in result.stderr and "Traceback" not in result.stderr


def test_command_line_reports_a_changed_migration(empty_db_url: str) -> None:
    migrate(empty_db_url)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_migrations SET checksum = repeat('0', 64) WHERE version = 1")
    result = subprocess.run(
        [sys.executable, "-m", "db", "migrate", "--url", empty_db_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "0001_predictions.sql was changed after it was applied" in result.stderr


# -- the schema enforces its rules even for SQL that skips the Store's checks ---------------------------
INSERT = """
WITH p AS (
    INSERT INTO predictions (digit, confidence, probabilities, model_name, model_version, latency_ms)
    VALUES (%(digit)s, %(confidence)s, %(probabilities)s, 'mnist', '1.0', 1.0)
    RETURNING id
)
INSERT INTO prediction_images (prediction_id, image_png, input_pixels) SELECT id, %(png)s, %(pixels)s FROM p
RETURNING prediction_id
"""


def _valid() -> dict:
    return {
        "digit": 3,
        "confidence": 0.9,
        "probabilities": [0.1] * 10,
        "png": drawing_png(),
        "pixels": bytes(784),
    }


@pytest.mark.parametrize(
    ("changes", "constraint"),
    [
        ({"digit": 10}, "predictions_digit_range"),
        ({"confidence": 1.5}, "predictions_confidence_range"),
        ({"probabilities": [0.1] * 9}, "predictions_probabilities_shape"),
        ({"probabilities": [0.1] * 9 + [None]}, "predictions_probabilities_shape"),
        ({"probabilities": [0.1] * 9 + [-0.5]}, "predictions_probabilities_shape"),
        ({"png": b"not a png"}, "prediction_images_png_valid"),
        ({"png": b"\x89PNG\r\n\x1a\n" + bytes(2_000_000)}, "prediction_images_png_valid"),
        ({"pixels": bytes(100)}, "prediction_images_input_pixels_size"),
    ],
)
def test_schema_rejects(db_url: str, changes: dict, constraint: str) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute(INSERT, _valid())  # the valid row is accepted
        with pytest.raises(psycopg.errors.CheckViolation) as info:
            conn.execute(INSERT, {**_valid(), **changes})
        assert info.value.diag.constraint_name == constraint


def test_schema_label_rules(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        (pid,) = one(conn.execute(INSERT, _valid()))
        with pytest.raises(psycopg.errors.CheckViolation, match="predictions_true_label_range"):
            conn.execute("UPDATE predictions SET true_label = 10, labelled_at = now() WHERE id = %s", (pid,))
        with pytest.raises(psycopg.errors.CheckViolation, match="predictions_label_time"):
            conn.execute("UPDATE predictions SET true_label = 4 WHERE id = %s", (pid,))


GROUPED = """
SELECT model_version, true_label, digit, count(*) FROM predictions GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""


def _counted(conn: psycopg.Connection) -> list[tuple]:
    rows = conn.execute(STATS).fetchall()
    return sorted(rows, key=lambda r: (r[0], -1 if r[1] is None else r[1], r[2]))


def _grouped(conn: psycopg.Connection) -> list[tuple]:
    return sorted(conn.execute(GROUPED).fetchall(), key=lambda r: (r[0], -1 if r[1] is None else r[1], r[2]))


def test_counters_follow_inserts_updates_and_deletes(db_url: str) -> None:
    conns = [psycopg.connect(db_url, autocommit=True) for _ in range(3)]  # three backends, other slots
    try:
        ids = []
        for i in range(30):
            row = {**_valid(), "digit": i % 10}
            ids.append(one(conns[i % 3].execute(INSERT, row))[0])
        update = "UPDATE predictions SET true_label = %s, labelled_at = now() WHERE id = %s"
        for i, pid in enumerate(ids[:20]):
            conns[i % 3].execute(update, (i % 7, pid))
        for i, pid in enumerate(ids[:5]):  # relabel
            conns[(i + 1) % 3].execute(update, ((i + 3) % 10, pid))
        conns[0].execute("UPDATE predictions SET model_version = '2.0' WHERE id = ANY(%s)", (ids[10:15],))
        conns[1].execute("DELETE FROM predictions WHERE id = ANY(%s)", (ids[25:],))
        assert _counted(conns[2]) == _grouped(conns[2])
        assert sum(r[3] for r in _counted(conns[2])) == 25
        with pytest.raises(psycopg.errors.DivisionByZero), conns[0].transaction():  # rolled back
            conns[0].execute(update, (9, ids[0]))
            conns[0].execute("SELECT 1/0")
        assert _counted(conns[2]) == _grouped(conns[2])
        with pytest.raises(psycopg.errors.DivisionByZero), conns[1].transaction():
            conns[1].execute(INSERT, _valid())
            conns[1].execute("SELECT 1/0")
        assert _counted(conns[2]) == _grouped(conns[2])
        conns[2].execute("TRUNCATE predictions CASCADE")
        assert _counted(conns[2]) == []
    finally:
        for conn in conns:
            conn.close()


def test_0003_counts_the_rows_already_there(empty_db_url: str, tmp_path: Path) -> None:
    first = tmp_path / "first"
    first.mkdir()
    for name in ("0001_predictions.sql", "0002_prediction_images.sql"):
        shutil.copy(MIGRATIONS_DIR / name, first)
    migrate(empty_db_url, first)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        for digit in (1, 1, 2):
            conn.execute(INSERT, {**_valid(), "digit": digit})
        conn.execute("UPDATE predictions SET true_label = 1, labelled_at = now() WHERE digit = 2")
    shutil.copy(MIGRATIONS_DIR / "0003_prediction_counts.sql", first)
    assert migrate(empty_db_url, first) == ["0003_prediction_counts.sql"]
    with psycopg.connect(empty_db_url) as conn:
        assert _counted(conn) == [("1.0", None, 1, 2), ("1.0", 1, 2, 1)]


def test_migrate_refuses_a_folder_without_migrations(tmp_path: Path, empty_db_url: str) -> None:
    with pytest.raises(MigrationError, match="no migration files"):
        migrate(empty_db_url, tmp_path)


def test_0004_key_is_optional_unique_and_bounded(db_url: str) -> None:
    keyed = INSERT.replace("latency_ms)", "latency_ms, key)").replace("1.0)", "1.0, %(key)s)")
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(INSERT, _valid())
        conn.execute(INSERT, _valid())  # rows without a key never conflict
        conn.execute(keyed, {**_valid(), "key": "k" * 200})
        with pytest.raises(psycopg.errors.UniqueViolation) as unique:
            conn.execute(keyed, {**_valid(), "key": "k" * 200})
        assert unique.value.diag.constraint_name == "predictions_key_unique"
        for bad in ("", "k" * 201):
            with pytest.raises(psycopg.errors.CheckViolation) as check:
                conn.execute(keyed, {**_valid(), "key": bad})
            assert check.value.diag.constraint_name == "predictions_key_length"
        assert _counted(conn) == _grouped(conn) == [("1.0", None, 3, 3)]  # the refused rows: not counted


def test_0004_keeps_the_rows_already_there(empty_db_url: str, tmp_path: Path) -> None:
    first = tmp_path / "first"
    first.mkdir()
    for path in sorted(MIGRATIONS_DIR.glob("000[1-3]_*.sql")):
        shutil.copy(path, first)
    migrate(empty_db_url, first)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        (pid,) = one(conn.execute(INSERT, _valid()))
    shutil.copy(MIGRATIONS_DIR / "0004_prediction_key.sql", first)
    assert migrate(empty_db_url, first) == ["0004_prediction_key.sql"]
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        assert conn.execute("SELECT id, key FROM predictions").fetchall() == [(pid, None)]


# -- 0005: label tokens and "not a digit" ---------------------------------------------------------------
NOT_A_DIGIT = (
    "UPDATE predictions SET not_a_digit = true, true_label = NULL, labelled_at = now() WHERE id = %s"
)
GROUPED_CHOICES = """
SELECT model_version, CASE WHEN not_a_digit THEN -2 ELSE true_label END, digit, count(*)
FROM predictions GROUP BY 1, 2, 3
"""


def _grouped_choices(conn: psycopg.Connection) -> list[tuple]:
    rows = conn.execute(GROUPED_CHOICES).fetchall()
    return sorted(rows, key=lambda r: (r[0], -1 if r[1] is None else r[1], r[2]))


def test_0005_keeps_the_rows_already_there(empty_db_url: str, tmp_path: Path) -> None:
    """Rows stored before 0005 keep their labels and counts; they have no token and are digits."""
    first = tmp_path / "first"
    first.mkdir()
    for path in sorted(MIGRATIONS_DIR.glob("000[1-4]_*.sql")):
        shutil.copy(path, first)
    migrate(empty_db_url, first)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        ids = [one(conn.execute(INSERT, {**_valid(), "digit": d}))[0] for d in (1, 1, 2)]
        conn.execute("UPDATE predictions SET true_label = 7, labelled_at = now() WHERE id = %s", (ids[2],))
    shutil.copy(MIGRATIONS_DIR / "0005_label_tokens.sql", first)
    assert migrate(empty_db_url, first) == ["0005_label_tokens.sql"]
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, true_label, not_a_digit, label_token_hash FROM predictions ORDER BY id"
        )
        assert rows.fetchall() == [
            (ids[0], None, False, None),
            (ids[1], None, False, None),
            (ids[2], 7, False, None),
        ]
        assert _counted(conn) == [("1.0", None, 1, 2), ("1.0", 7, 2, 1)]
        conn.execute(NOT_A_DIGIT, (ids[0],))  # an old row can still be changed (by the operator)
        assert _counted(conn) == [("1.0", -2, 1, 1), ("1.0", None, 1, 1), ("1.0", 7, 2, 1)]


def test_0005_not_a_digit_rules(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        (pid,) = one(conn.execute(INSERT, _valid()))
        conn.execute(NOT_A_DIGIT, (pid,))
        assert one(conn.execute("SELECT labelled_at IS NOT NULL FROM predictions WHERE id = %s", (pid,))) == (
            True,
        )
        with pytest.raises(psycopg.errors.CheckViolation) as both:
            conn.execute("UPDATE predictions SET true_label = 3 WHERE id = %s", (pid,))
        assert both.value.diag.constraint_name == "predictions_not_a_digit_unlabelled"
        with pytest.raises(psycopg.errors.CheckViolation) as untimed:
            conn.execute("UPDATE predictions SET labelled_at = NULL WHERE id = %s", (pid,))
        assert untimed.value.diag.constraint_name == "predictions_label_time"
        for bad in ("", "A" * 64, "0" * 63, "g" * 64):
            with pytest.raises(psycopg.errors.CheckViolation) as token:
                conn.execute("UPDATE predictions SET label_token_hash = %s WHERE id = %s", (bad, pid))
            assert token.value.diag.constraint_name == "predictions_label_token_hash_hex"
        conn.execute("UPDATE predictions SET label_token_hash = %s WHERE id = %s", ("0a" * 32, pid))


def test_0005_counters_count_not_a_digit_apart_and_follow_deletes(db_url: str) -> None:
    conns = [psycopg.connect(db_url, autocommit=True) for _ in range(2)]
    try:
        ids = [one(conns[i % 2].execute(INSERT, {**_valid(), "digit": i % 10}))[0] for i in range(20)]
        update = "UPDATE predictions SET true_label = %s, labelled_at = now() WHERE id = %s"
        for pid in ids[:6]:
            conns[0].execute(NOT_A_DIGIT, (pid,))
        for i, pid in enumerate(ids[6:12]):
            conns[1].execute(update, (i, pid))
        conns[0].execute(  # not a digit after all: a digit again
            "UPDATE predictions SET not_a_digit = false, true_label = 5 WHERE id = %s", (ids[0],)
        )
        conns[1].execute(NOT_A_DIGIT, (ids[6],))  # a digit first, then not a digit
        assert _counted(conns[0]) == _grouped_choices(conns[0])
        assert sum(r[3] for r in _counted(conns[0]) if r[1] == -2) == 6
        conns[1].execute("DELETE FROM predictions WHERE id = ANY(%s)", (ids[1:4] + ids[7:9] + ids[15:],))
        assert _counted(conns[0]) == _grouped_choices(conns[0])
        assert sum(r[3] for r in _counted(conns[0])) == 20 - 10
        images = one(conns[0].execute("SELECT count(*) FROM prediction_images"))
        assert images == (10,)  # the drawings went with their rows
    finally:
        for conn in conns:
            conn.close()
