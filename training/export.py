"""Pack the trained weights and the handler into `model_store/mnist.mar`, without retraining.

`python -m training.export [--weights model_store/mnist.pt] [--output-dir model_store]`

torch-model-archiver builds the archive; it is then normalised (entries sorted, fixed timestamps
and permissions, MANIFEST `createdOn` set from the model card) so that the same inputs always
give a byte-identical `.mar`. The card records the archive's sha256.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any

from training import card
from training.data import sha256_of

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "mnist"
VERSION = "1.0"
HANDLER = ROOT / "handlers" / "mnist_handler.py"
MODEL_FILE = ROOT / "training" / "model.py"
# Files the handler imports at runtime; they land beside it at the archive's root.
EXTRA_FILES: tuple[Path, ...] = (ROOT / "handlers" / "preprocess.py",)
DEFAULT_STORE = ROOT / "model_store"
MANIFEST = "MAR-INF/MANIFEST.json"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
FALLBACK_CREATED_ON = "01/01/2000 00:00:00"


class ExportError(RuntimeError):
    """The archive cannot be built; the message says which input is missing or what failed."""


def archiver_command(weights: Path, workdir: Path, handler: Path, extra: tuple[Path, ...]) -> list[str]:
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    return [
        str(archiver),
        "--model-name", MODEL_NAME,
        "--version", VERSION,
        "--serialized-file", str(weights),
        "--model-file", str(MODEL_FILE),
        "--handler", str(handler),
        "--extra-files", ",".join(str(p) for p in extra),
        "--export-path", str(workdir),
        "--force",
    ]  # fmt: skip


def normalise(src: Path, dest: Path, created_on: str) -> None:
    """Rewrite a zip deterministically: sorted entries, fixed dates and modes, fixed createdOn."""
    with zipfile.ZipFile(src) as zin:
        entries = sorted((info.filename, zin.read(info)) for info in zin.infolist() if not info.is_dir())
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with zipfile.ZipFile(tmp, "w") as zout:
            for name, data in entries:
                if name == MANIFEST:
                    manifest = json.loads(data)
                    manifest["createdOn"] = created_on
                    data = (json.dumps(manifest, indent=2) + "\n").encode()
                info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                info.create_system = 3  # unix, whatever the build machine
                zout.writestr(info, data, compresslevel=9)
        tmp.chmod(0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def created_on(model_card: dict[str, Any] | None) -> str:
    """MANIFEST's createdOn: the training time from the card (an input, so rebuilds agree)."""
    if model_card and model_card.get("trained_at"):
        return datetime.strptime(model_card["trained_at"], "%Y-%m-%dT%H:%M:%SZ").strftime("%d/%m/%Y %H:%M:%S")
    return FALLBACK_CREATED_ON


def build(
    weights: Path,
    output_dir: Path,
    handler: Path = HANDLER,
    extra_files: tuple[Path, ...] = EXTRA_FILES,
) -> Path:
    """Build `output_dir/mnist.mar` from the weights; update the card there if it exists."""
    missing = [p for p in (weights, MODEL_FILE, handler, *extra_files) if not p.is_file()]
    if missing:
        raise ExportError("cannot build the archive, missing: " + ", ".join(str(p) for p in missing))
    output_dir.mkdir(parents=True, exist_ok=True)
    model_card = card.read(output_dir)
    with tempfile.TemporaryDirectory(prefix="mar-") as work:
        cmd = archiver_command(weights, Path(work), handler, extra_files)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        raw = Path(work) / f"{MODEL_NAME}.mar"
        if proc.returncode != 0 or not raw.exists():
            raise ExportError(f"torch-model-archiver failed ({proc.returncode}): {proc.stderr.strip()}")
        mar = output_dir / f"{MODEL_NAME}.mar"
        normalise(raw, mar, created_on(model_card))

    if model_card is not None:
        model_card["archive"] = {
            "file": mar.name,
            "sha256": sha256_of(mar),
            "bytes": mar.stat().st_size,
            "version": VERSION,
            "handler": handler.name,
            "handler_sha256": sha256_of(handler),
            "weights_sha256": sha256_of(weights),
            "files": sorted(zipfile.ZipFile(mar).namelist()),
        }
        card.write(output_dir, model_card)
    return mar


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=DEFAULT_STORE / "mnist.pt", help="state_dict file")
    p.add_argument("--output-dir", type=Path, default=None, help="default: the weights' directory")
    args = p.parse_args(argv)
    try:
        mar = build(args.weights, args.output_dir or args.weights.parent)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{mar} ({mar.stat().st_size:,} bytes, sha256 {sha256_of(mar)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
