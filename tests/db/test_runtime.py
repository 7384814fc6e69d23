"""Choosing the database: an explicit URL / DATABASE_URL, or the embedded server under data_dir."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest

from db.embedded import EmbeddedPostgres
from db.runtime import database_url, start_database
from settings import Settings
from tests.db.samples import one


def test_a_given_url_is_used_and_migrated(empty_db_url: str) -> None:
    database = start_database(empty_db_url)
    assert database.url == empty_db_url and not database.embedded
    database.stop()  # nothing to stop
    with psycopg.connect(empty_db_url) as conn:
        assert one(conn.execute("SELECT count(*) FROM schema_migrations"))[0] >= 3


def test_database_url_setting_is_used(empty_db_url: str) -> None:
    with database_url(settings=Settings(database_url=empty_db_url)) as url:
        assert url == empty_db_url


@pytest.mark.slow
def test_embedded_server_when_no_url() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="pytest-runtime-"))
    try:
        settings = Settings(database_url=None, data_dir=tmp)
        database = start_database(settings=settings)
        try:
            assert database.embedded and str(tmp / "postgres") in database.url
            with psycopg.connect(database.url) as conn:
                assert conn.execute("SELECT count(*) FROM predictions").fetchone() == (0,)
        finally:
            database.stop()
        assert not EmbeddedPostgres(tmp / "postgres").is_running()
        # The same data, started again.
        with database_url(settings=settings) as url, psycopg.connect(url) as conn:
            assert one(conn.execute("SELECT count(*) FROM schema_migrations"))[0] >= 3
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
