"""Pack the trained weights and the handler into `model_store/mnist.mar`, without retraining.

`python -m training.export [--weights model_store/mnist.pt] [--output-dir model_store]`

torch-model-archiver builds the archive; it is then normalised (entries sorted, fixed timestamps
and permissions, MANIFEST `createdOn` set from the model card) so that the same inputs always
give a byte-identical `.mar`. The card records the archive's sha256.

The archive also holds `mnist.onnx`, the same network exported for ONNX Runtime (the handler's
fast CPU path; the export is deterministic, so rebuilds stay byte-identical; it needs the `onnx`
package at build time). The softmax temperature (`training.calibrate`) travels inside the archive as
`calibration.json`,
taken from the card's `calibration` entry unless given: an archive without it is served with T=1.
New versions (the learning loop) are built with `build(..., version="2.0", file_name="mnist-2.0.mar")`;
`weights_from_archive` reads a version's weights back to fine-tune from them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from handlers.model_runtime import LogitsAndFeatures
from training import card
from training.data import sha256_of
from training.model import Net

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "mnist"
VERSION = "1.0"
HANDLER = ROOT / "handlers" / "mnist_handler.py"
MODEL_FILE = ROOT / "training" / "model.py"
# Files the handler imports at runtime; they land beside it at the archive's root.
EXTRA_FILES: tuple[Path, ...] = (ROOT / "handlers" / "preprocess.py", ROOT / "handlers" / "model_runtime.py")
DEFAULT_STORE = ROOT / "model_store"
MANIFEST = "MAR-INF/MANIFEST.json"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
FALLBACK_CREATED_ON = "01/01/2000 00:00:00"
# The handler's calibration file at the archive's root; {"temperature": T}.
CALIBRATION_FILE = "calibration.json"
ONNX_FILE = "mnist.onnx"
ONNX_OPSET = 17

DIGITNESS_FILE = "digitness.json"  # the "not a digit" head (training/digitness.py)
DIGITNESS_KEYS = ("bias", "features", "threshold", "weights_f32_base64")


class ExportError(RuntimeError):
    """The archive cannot be built; the message says which input is missing or what failed."""


def archiver_command(
    weights: Path, workdir: Path, handler: Path, extra: tuple[Path, ...], version: str = VERSION
) -> list[str]:
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    return [
        str(archiver),
        "--model-name", MODEL_NAME,
        "--version", version,
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


def write_onnx(weights: Path, dest: Path) -> None:
    """The network of `weights` as ONNX (input `input` (N, 1, 28, 28); outputs `logits`, `features`).

    The TorchScript-based exporter: deterministic bytes for the same weights, and no onnxscript.
    """
    net = Net()
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net.eval()
    batch = {0: "batch"}
    try:
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated in favour of dynamo
            warnings.simplefilter("ignore")
            torch.onnx.export(
                LogitsAndFeatures(net),
                (torch.zeros(1, 1, 28, 28),),
                str(dest),
                dynamo=False,
                input_names=["input"],
                output_names=["logits", "features"],
                dynamic_axes={"input": batch, "logits": batch, "features": batch},
                opset_version=ONNX_OPSET,
            )
    except Exception as exc:  # onnx missing, or an operator without an ONNX form
        raise ExportError(f"cannot export the network to ONNX (pip install onnx): {exc}") from exc


def calibration_bytes(calibration: Mapping[str, Any]) -> bytes:
    """A JSON file of the archive (calibration.json, digitness.json): sorted keys, so rebuilds agree."""
    return (json.dumps(dict(calibration), indent=2, sort_keys=True) + "\n").encode()


def build(
    weights: Path,
    output_dir: Path,
    handler: Path = HANDLER,
    extra_files: tuple[Path, ...] = EXTRA_FILES,
    *,
    version: str = VERSION,
    file_name: str | None = None,
    calibration: Mapping[str, Any] | None = None,
    digitness: Mapping[str, Any] | None = None,
    update_card: bool = True,
) -> Path:
    """Build `output_dir/<file_name>` (default `mnist.mar`) from the weights; update the card there if any.

    `version` is the MANIFEST's modelVersion (what TorchServe registers and the handler reports).
    `calibration` ({"temperature": T}) defaults to the card's `calibration.temperature`; with neither, the
    archive has no calibration.json and is served uncalibrated (T=1). `digitness` (the head of
    training/digitness.py) defaults to the card's `digitness`; without it answers have no `is_digit`.
    `update_card=False` leaves a card
    in output_dir alone (several versions built into one folder).
    """
    missing = [p for p in (weights, MODEL_FILE, handler, *extra_files) if not p.is_file()]
    if missing:
        raise ExportError("cannot build the archive, missing: " + ", ".join(str(p) for p in missing))
    if file_name is not None and (Path(file_name).name != file_name or not file_name.endswith(".mar")):
        raise ExportError(f"archive file name must be a plain name ending in .mar, not {file_name!r}")
    output_dir.mkdir(parents=True, exist_ok=True)
    model_card = card.read(output_dir)
    if calibration is None and model_card is not None and model_card.get("calibration"):
        calibration = {"temperature": model_card["calibration"]["temperature"]}
    if digitness is None and model_card is not None and model_card.get("digitness"):
        digitness = model_card["digitness"]
    mar = output_dir / (file_name or f"{MODEL_NAME}.mar")
    with tempfile.TemporaryDirectory(prefix="mar-") as work:
        generated = Path(work) / "generated"
        generated.mkdir()
        write_onnx(weights, generated / ONNX_FILE)
        extra = (*extra_files, generated / ONNX_FILE)
        if calibration is not None:
            (generated / CALIBRATION_FILE).write_bytes(calibration_bytes(calibration))
            extra = (*extra, generated / CALIBRATION_FILE)
        if digitness is not None:
            head = {key: digitness[key] for key in DIGITNESS_KEYS}
            (generated / DIGITNESS_FILE).write_bytes(calibration_bytes(head))
            extra = (*extra, generated / DIGITNESS_FILE)
        cmd = archiver_command(weights, Path(work), handler, extra, version)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        raw = Path(work) / f"{MODEL_NAME}.mar"
        if proc.returncode != 0 or not raw.exists():
            raise ExportError(f"torch-model-archiver failed ({proc.returncode}): {proc.stderr.strip()}")
        normalise(raw, mar, created_on(model_card))

    if model_card is not None and update_card:
        model_card["archive"] = {
            "file": mar.name,
            "sha256": sha256_of(mar),
            "bytes": mar.stat().st_size,
            "version": version,
            "handler": handler.name,
            "handler_sha256": sha256_of(handler),
            "weights_sha256": sha256_of(weights),
            "files": sorted(zipfile.ZipFile(mar).namelist()),
        }
        card.write(output_dir, model_card)
    return mar


def read_manifest(mar: Path) -> dict[str, Any]:
    """The archive's MANIFEST.json."""
    with zipfile.ZipFile(mar) as z:
        manifest: dict[str, Any] = json.loads(z.read(MANIFEST))
    return manifest


def extras_from_archive(mar: Path) -> dict[str, dict[str, Any]]:
    """The calibration and digit head an archive carries, as `build` keywords.

    A new version fine-tuned from this one can be built with them (`build(..., calibration=
    extras.get("calibration"), digitness=extras.get("digitness"))`) so its
    answers keep calibrated probabilities and `is_digit`; both were fitted on the base weights, so
    refitting them on the new weights (training.calibrate, training.digitness) is better still.
    """
    out: dict[str, dict[str, Any]] = {}
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        for key, name in (("calibration", CALIBRATION_FILE), ("digitness", DIGITNESS_FILE)):
            if name in names:
                out[key] = json.loads(z.read(name))
    return out


def weights_from_archive(mar: Path) -> dict[str, torch.Tensor]:
    """The state_dict serialized in an archive (the MANIFEST's serializedFile), on the CPU.

    Loaded with `weights_only=True`: an archive is data here, never code to run.
    """
    try:
        with zipfile.ZipFile(mar) as z:
            name = json.loads(z.read(MANIFEST))["model"]["serializedFile"]
            data = z.read(name)
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read the weights from {mar}: {exc}") from exc
    state: dict[str, torch.Tensor] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return state


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
