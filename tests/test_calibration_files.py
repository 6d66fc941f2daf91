"""A calibration is replaced whole: Ctrl-C or an error while writing leaves the old one or the new one and a
model that loads; a calibration that no longer matches the manifest is set aside by the next calibrate."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.cli import main
from edge_runtime.pack.loader import load_packed
from edge_runtime.sparsity import calibration_files
from edge_runtime.sparsity.calibration_files import (
    CALIBRATION_FILE,
    THRESHOLDS_FILE,
    read_calibration,
    write_calibration,
)
from tests.helpers import CORPUS, calibrated_llama

OLD = {"calibration_version": 2, "ppl_dense": 12.5, "predictors": {}}
NEW = {"calibration_version": 2, "ppl_dense": 13.0, "predictors": {}}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    pytest.importorskip("torch")
    return calibrated_llama(tmp_path_factory.mktemp("calibration-files"), OLD, seed=62)


@pytest.fixture()
def model(calibrated, tmp_path):
    return shutil.copytree(calibrated, tmp_path / "m")


def stray_files(model) -> list[str]:
    return sorted(p.name for p in model.iterdir() if p.name.startswith("."))


def test_ctrl_c_during_the_swap_waits_for_it(model, monkeypatch):
    """The interrupt lands between the files' swap and the manifest's update (where it used to leave a model
    that failed its checksums); it is delivered once both are done."""
    real = calibration_files.record_files

    def interrupted(*args):
        signal.raise_signal(signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(calibration_files, "record_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_calibration(model, NEW, {"layers.0.q": np.linspace(0.2, 0.8, 160, dtype=np.float32)})
    load_packed(model, verify=True)
    assert read_calibration(model)[0]["ppl_dense"] == NEW["ppl_dense"]
    assert stray_files(model) == []


def test_an_error_while_writing_keeps_the_old_calibration(model):
    before = {n: (model / n).read_bytes() for n in (CALIBRATION_FILE, THRESHOLDS_FILE, "manifest.yaml")}
    with pytest.raises(Exception):  # noqa: B017 (safetensors' own error type for a value that is not an array)
        write_calibration(model, NEW, {"layers.0.q": "not an array"})
    assert {n: (model / n).read_bytes() for n in before} == before
    assert stray_files(model) == []
    load_packed(model, verify=True)


def test_calibrate_sets_aside_a_calibration_that_fails_its_checksum(model, tmp_path, capsys):
    data = bytearray((model / CALIBRATION_FILE).read_bytes())
    data[-3] ^= 0x01
    (model / CALIBRATION_FILE).write_bytes(bytes(data))
    generate = ["generate", "--model", str(model), "--prompt", "the", "--max-new-tokens", "2", "--backend", "cpu"]
    assert main(generate) == 2
    assert "run 'edge-runtime calibrate' again" in capsys.readouterr().err
    text = tmp_path / "calib.txt"
    text.write_text(CORPUS * 3)
    assert main(["calibrate", "--model", str(model), "--text", str(text), "--max-tokens", "256", "--window", "64",
                 "--attention-levels", "none"]) == 0
    err = capsys.readouterr().err
    assert "did not match the manifest" in err and CALIBRATION_FILE in err
    assert (model / (CALIBRATION_FILE + ".set-aside")).read_bytes() == bytes(data)  # kept, not deleted
    assert main(generate) == 0
    assert read_calibration(model)[0]["predictors"]  # the new calibration, with its predictor tables


@pytest.mark.parametrize("text, extra, message", [
    (CORPUS * 3, ["--window", "1"], "window must be at least 2"),
    ("the robot opens the door.", [], "needs at least 128"),
])
def test_calibrate_refuses_what_would_fit_noise(model, tmp_path, capsys, text, extra, message):
    before = {n: (model / n).read_bytes() for n in (CALIBRATION_FILE, THRESHOLDS_FILE, "manifest.yaml")}
    path = tmp_path / "calib.txt"
    path.write_text(text)
    assert main(["calibrate", "--model", str(model), "--text", str(path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert {n: (model / n).read_bytes() for n in before} == before


def test_calibrate_into_a_read_only_model_fails_before_calibrating(model, tmp_path, capsys, monkeypatch):
    """It ran the whole calibration (minutes with attention levels) and only then said it could not write. The
    read-only directory is simulated (root, which runs the tests here, writes through chmod 0555)."""
    import tempfile

    from edge_runtime.sparsity import calibrate as calibrate_module

    real_mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kw):
        if dir is not None and Path(dir) == model:
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kw)

    monkeypatch.setattr(calibration_files.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(calibrate_module, "calibrate", lambda *a, **k: pytest.fail("calibrated before checking"))
    text = tmp_path / "calib.txt"
    text.write_text(CORPUS * 3)
    assert main(["calibrate", "--model", str(model), "--text", str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write calibration.yaml" in err and "Permission denied" in err


def test_calibrate_with_a_mistyped_model_says_it_does_not_exist(tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text(CORPUS * 3)
    assert main(["calibrate", "--model", str(tmp_path / "no-such-model"), "--text", str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err and "cannot write" not in err
