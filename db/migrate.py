"""Apply the plain SQL files in `db/migrations/` in order, once each.

`python -m db migrate` (in `db/__main__.py`) migrates `DATABASE_URL`, or, when unset, the embedded
server under `data_dir/postgres`. Each file runs in its own transaction and is recorded in
`schema_migrations` with its SHA-256; a PostgreSQL advisory lock serialises concurrent runs; an
applied file whose content has changed since is an error, never silently re-run.

After our files, the job queue's own schema (procrastinate's, `db.queue`) is applied under the same
lock when its tables are absent, so that one step migrates everything. Only a run on the app's own
`MIGRATIONS_DIR` does so (tests of the runner with other folders do not), and procrastinate is
imported only then: `import db.migrate` does not import it.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
FILENAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# An arbitrary fixed key: every migrator of this app takes the same advisory lock.
LOCK_KEY = 7_241_905_318_004_211

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The migrations on disk and those recorded in the database disagree, or a file is misnamed."""


@dataclass(frozen=True)
class Migration:
    """One SQL file: `0001_predictions.sql` is version 1, name `predictions`."""

    version: int
    name: str
    sql: str
    checksum: str

    @property
    def filename(self) -> str:
        return f"{self.version:04d}_{self.name}.sql"


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files in version order; misnamed `.sql` files and duplicate versions are errors."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = FILENAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_lowercase_name.sql")
        data = path.read_bytes()
        migration = Migration(
            version=int(match[1]),
            name=match[2],
            sql=data.decode("utf-8"),
            checksum=hashlib.sha256(data).hexdigest(),
        )
        if migration.version in found:
            raise MigrationError(f"two migrations have version {migration.version}: {path.name}")
        found[migration.version] = migration
    return [found[v] for v in sorted(found)]


def pending(migrations: list[Migration], applied: dict[int, tuple[str, str]]) -> list[Migration]:
    """The migrations still to apply, after checking the applied ones (version -> (name, checksum))."""
    on_disk = {m.version: m for m in migrations}
    for version, (name, checksum) in sorted(applied.items()):
        migration = on_disk.get(version)
        if migration is None:
            raise MigrationError(
                f"the database has migration {version:04d}_{name} applied, but there is no such file "
                "(is this code older than the database?)"
            )
        if migration.checksum != checksum:
            raise MigrationError(
                f"{migration.filename} was changed after it was applied (checksum {checksum[:12]}… in the "
                f"database, {migration.checksum[:12]}… on disk); add a new migration instead of editing it"
            )
    return [m for m in migrations if m.version not in applied]


@dataclass(frozen=True)
class Applied:
    """What one run applied: our files (names), and whether the queue's schema was applied now."""

    files: list[str]
    queue_schema: bool


def migrate(url: str, directory: Path = MIGRATIONS_DIR, *, queue_schema: bool | None = None) -> list[str]:
    """Apply the pending migrations to the database at `url`; return the file names applied now.
    `queue_schema`: also apply the job queue's schema when absent (default: for `MIGRATIONS_DIR` only)."""
    return apply_all(url, directory, queue_schema=queue_schema).files


def apply_all(url: str, directory: Path = MIGRATIONS_DIR, *, queue_schema: bool | None = None) -> Applied:
    """`migrate`, saying also whether the queue's schema was applied now (`python -m db migrate` says)."""
    if queue_schema is None:
        queue_schema = directory.resolve() == MIGRATIONS_DIR
    migrations = load_migrations(directory)
    if not migrations:  # e.g. a package installed without its data files: never report "up to date"
        raise MigrationError(f"no migration files in {directory}")
    applied_now: list[str] = []
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            conn.execute(CREATE_TABLE)
            rows = conn.execute("SELECT version, name, checksum FROM schema_migrations").fetchall()
            todo = pending(migrations, {v: (n, c) for v, n, c in rows})
            for migration in todo:
                with conn.transaction():
                    conn.execute(migration.sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (migration.version, migration.name, migration.checksum),
                    )
                applied_now.append(migration.filename)
            queue_applied = False
            if queue_schema:
                from db.queue import apply_schema_locked

                try:
                    queue_applied = apply_schema_locked(conn)
                except ImportError as exc:
                    raise MigrationError(
                        f"the job queue's schema comes from the procrastinate package, not installed: {exc}"
                    ) from exc
        finally:
            if not conn.closed:
                conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    return Applied(applied_now, queue_applied)


if __name__ == "__main__":  # the former command, `python -m db.migrate [--url URL]`
    from db.__main__ import main

    sys.exit(main(["migrate", *sys.argv[1:]]))
