"""A model's calibration on disk: calibration.yaml (tables, the greedy path, TEAL thresholds) and
predictor_thresholds.safetensors (the projection predictor's per-neuron thresholds), both covered by the
manifest's checksums. Writing stages both files whole, then swaps them in and records their checksums in one
stretch that Ctrl-C waits for, so an interrupted calibrate leaves the old calibration or the new one. A pair
that no longer matches the manifest anyway (power lost mid-swap, a file edited by hand) makes the model
refuse to load; `calibrate` sets such a pair aside (renamed NAME.set-aside, kept for whoever wants it back)
before it loads the model, and writes a new one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import yaml

from edge_runtime.atomic_write import save_arrays, staged, yaml_text
from edge_runtime.deferred_signals import signals_deferred
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.pack.format import (
    CALIBRATION_FILES,
    file_entry,
    read_manifest,
    record_files,
    write_manifest,
)

CALIBRATION_FILE, THRESHOLDS_FILE = CALIBRATION_FILES
CALIBRATION_VERSION = 2


def write_calibration(model_dir: Path, calib: dict, thresholds: dict) -> Path:
    """calib (the YAML's content) and thresholds ({"layers.i.qk": (N,) float32}, may be empty: the old
    thresholds file then stays, unread) into model_dir, and their checksums into its manifest."""
    model_dir = Path(model_dir)
    temps: dict[str, Path] = {}
    try:
        if thresholds:
            temps[THRESHOLDS_FILE] = staged(model_dir / THRESHOLDS_FILE, lambda tmp: save_arrays(thresholds, tmp))
        temps[CALIBRATION_FILE] = staged(model_dir / CALIBRATION_FILE,
                                         lambda tmp: Path(tmp).write_text(yaml_text(calib), encoding="utf-8"))
        with signals_deferred():
            for name, tmp in temps.items():
                os.replace(tmp, model_dir / name)
            record_files(model_dir, [n for n in CALIBRATION_FILES if (model_dir / n).is_file()])
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)  # only those not swapped in: an error or Ctrl-C before the swap
    return model_dir / CALIBRATION_FILE


def check_writable(model_dir: Path) -> None:
    """Before minutes of calibration: can a file be made in model_dir (a read-only mount, another user's
    install)? Tried by making one, which also answers for root and for ACLs, where os.access would not. A path
    that is not a directory is left to the loader, whose message says what it is."""
    if not Path(model_dir).is_dir():
        return
    try:
        fd, name = tempfile.mkstemp(prefix=".calibrate-check-", dir=model_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise EdgeRuntimeError(f"cannot write calibration.yaml into {model_dir}: {e.strerror}; copy the model "
                               "somewhere writable and calibrate the copy") from None


SET_ASIDE = ".set-aside"


def set_aside_broken_calibration(model_dir: Path) -> list[str]:
    """Calibration files that do not match the manifest, which would make the model refuse to load: their
    entries dropped and the files renamed NAME.set-aside (replacing an older one). Returns the names set
    aside. A calibration that matches is left alone."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    recorded = manifest["files"]

    def intact(name: str) -> bool:
        path = model_dir / name
        if name not in recorded:
            return not os.path.lexists(path)
        return path.is_file() and file_entry(path) == recorded[name]  # calibration files are small: hash them

    if all(intact(n) for n in CALIBRATION_FILES):
        return []
    present = [n for n in CALIBRATION_FILES if n in recorded or os.path.lexists(model_dir / n)]
    with signals_deferred():
        for name in present:
            recorded.pop(name, None)
        write_manifest(model_dir, manifest)
        for name in present:
            if os.path.lexists(model_dir / name):
                os.replace(model_dir / name, model_dir / (name + SET_ASIDE))
    return present


def read_calibration(model_dir: Path) -> tuple[dict, dict] | None:
    """(calibration, thresholds) or None when the model is not calibrated."""
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    again = "run 'edge-runtime calibrate' again"
    try:
        calib = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise EdgeRuntimeError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(calib, dict) or calib.get("calibration_version") != CALIBRATION_VERSION:
        raise EdgeRuntimeError(f"{path} is not a version-{CALIBRATION_VERSION} calibration; {again}")
    for key in ("ppl_dense", "predictors"):
        if key not in calib:
            raise EdgeRuntimeError(f"{path} is missing '{key}'; {again}")
    thresholds = {}
    if "projection" in (calib["predictors"] or {}):
        tpath = Path(model_dir) / THRESHOLDS_FILE
        from edge_runtime.pack.safetensors_mmap import SafetensorsFile

        f = SafetensorsFile(str(tpath))
        thresholds = {k: np.asarray(f.tensor(k)) for k in f.keys()}  # noqa: SIM118 (not a dict)
    return calib, thresholds
