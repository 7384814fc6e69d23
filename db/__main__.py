"""The database's command line: `python -m db migrate` and `python -m db export OUT.zip`.

Both take `--database-url URL`, else `DATABASE_URL`, else the embedded server under
`DATA_DIR/postgres` (started for the command and stopped after it). With a URL the embedded
server's package is never imported: the UI image, which runs these commands, does not have it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import zipfile
from pathlib import Path

import psycopg

from db.embedded import EmbeddedPostgresError
from db.errors import StoreError
from db.export import drawing_files, export_zip
from db.migrate import MigrationError, apply_all
from db.runtime import database_url
from db.store import Store


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status is 0 on success, 1 on an error (printed to stderr)."""
    parser = argparse.ArgumentParser(prog="python -m db", description=(__doc__ or "").splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    migrate_command = commands.add_parser("migrate", help="apply the pending migrations")
    export_command = commands.add_parser("export", help="write the zip of labelled drawings")
    export_command.add_argument("out", type=Path, help="the zip to write")
    for command in (migrate_command, export_command):
        command.add_argument(
            "--database-url",
            "--url",
            dest="database_url",
            help="PostgreSQL URL (default: DATABASE_URL, else the embedded server)",
        )
    args = parser.parse_args(argv)
    if args.command == "migrate":
        return run_migrate(args.database_url)
    return run_export(args.database_url, args.out)


def run_migrate(url: str | None) -> int:
    try:
        with database_url(url) as resolved:
            applied = apply_all(resolved)
    except MigrationError as exc:
        print(f"migration error: {exc}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"migration failed: database unavailable: {exc}", file=sys.stderr)
        return 1
    except EmbeddedPostgresError as exc:
        print(f"migration failed: {exc}", file=sys.stderr)
        return 1
    names = applied.files + (["the job queue's schema (procrastinate)"] if applied.queue_schema else [])
    print("applied: " + ", ".join(names) if names else "up to date: nothing to apply")
    return 0


def run_export(url: str | None, out: Path) -> int:
    async def export(resolved: str) -> bytes:
        async with await Store.open(resolved) as store:
            return await export_zip(store.labelled())

    try:
        with database_url(url) as resolved:
            data = asyncio.run(export(resolved))
    except (StoreError, EmbeddedPostgresError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    out.write_bytes(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        count = len(drawing_files(zf))
    print(f"wrote {out}: {count} labelled drawings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
