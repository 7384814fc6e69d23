"""Which database the app uses: `DATABASE_URL`, or an embedded server under `data_dir/postgres`.

`start_database` is the one place that starts a database. For a program: `db = start_database()`
at start-up (starts the embedded server if needed and applies the migrations), `db.url` for
`Store.open`, `db.stop()` at shutdown. For a command: `with database_url() as url: ...`.

The embedded server's module (and its package, absent from the UI image) is imported only when
no URL is given.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from db.migrate import migrate
from settings import Settings, get_settings

if TYPE_CHECKING:
    from db.embedded import EmbeddedPostgres


@dataclass
class Database:
    """A database URL, and the embedded server behind it when there is one."""

    url: str
    server: EmbeddedPostgres | None = None

    @property
    def embedded(self) -> bool:
        return self.server is not None

    def stop(self) -> None:
        """Stop the embedded server (no-op for an external `DATABASE_URL`)."""
        if self.server is not None:
            self.server.stop()


def start_database(
    url: str | None = None, settings: Settings | None = None, *, apply_migrations: bool = True
) -> Database:
    """`url`, else `DATABASE_URL`, else a started embedded server; migrated unless told otherwise."""
    settings = settings or get_settings()
    url = url or settings.database_url
    database = Database(url) if url else _embedded(settings)
    if apply_migrations:
        try:
            migrate(database.url)
        except BaseException:
            database.stop()
            raise
    return database


def _embedded(settings: Settings) -> Database:
    from db.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(settings.data_dir / "postgres")
    return Database(server.start(), server)


@contextmanager
def database_url(url: str | None = None, settings: Settings | None = None) -> Iterator[str]:
    """`url`, `DATABASE_URL` or an embedded server (stopped on exit); not migrated."""
    database = start_database(url, settings, apply_migrations=False)
    try:
        yield database.url
    finally:
        database.stop()
