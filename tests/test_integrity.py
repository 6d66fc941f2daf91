"""Integrity: calibration files are covered by the manifest's checksums (calibrate records them), the
manifest's digest is printed by info and can be pinned, the daemon's port clash is one line."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket

import pytest
import yaml

from edge_runtime.cli import main
from edge_runtime.sparsity.calibration_files import CALIBRATION_FILE, THRESHOLDS_FILE
from tests.helpers import calibrated_llama

# a calibration the runtime reads (no predictor sections: nothing for the policy to select)
CALIB = {"calibration_version": 2, "ppl_dense": 12.5, "predictors": {}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pytest.importorskip("torch")
    return calibrated_llama(tmp_path_factory.mktemp("integrity"), CALIB, seed=61)


def digest(path) -> str:
    return hashlib.sha256((path / "manifest.yaml").read_bytes()).hexdigest()


def generate(capsys, model, *extra) -> tuple[int, str]:
    code = main(["generate", "--model", str(model), "--prompt", "the", "--max-new-tokens", "2", "--backend", "cpu",
                 "--profile", "cpu-generic", *extra])
    return code, capsys.readouterr().err


def test_calibrate_records_checksums(model):
    files = yaml.safe_load((model / "manifest.yaml").read_text())["files"]
    for name in (CALIBRATION_FILE, THRESHOLDS_FILE):
        assert files[name] == {"sha256": hashlib.sha256((model / name).read_bytes()).hexdigest(),
                               "bytes": (model / name).stat().st_size}
    assert not list(model.glob(".manifest.yaml.*"))  # the atomic rewrite left no temporary file


@pytest.mark.parametrize("name", [CALIBRATION_FILE, THRESHOLDS_FILE])
def test_changed_calibration_fails_its_checksum(capsys, model, tmp_path, name):
    m = shutil.copytree(model, tmp_path / "m")
    data = bytearray((m / name).read_bytes())
    data[-3] ^= 0x01
    (m / name).write_bytes(bytes(data))
    code, err = generate(capsys, m)
    assert code == 2 and err.strip().splitlines() == [err.strip()] and "checksum" in err and name in err


def test_info_prints_the_digest_and_it_pins_the_model(capsys, model, tmp_path):
    assert main(["info", str(model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["manifest_sha256"] == digest(model)
    assert main(["info", str(model)]) == 0
    assert f"manifest sha256: {digest(model)}" in capsys.readouterr().out
    assert generate(capsys, model, "--manifest-sha256", digest(model))[0] == 0
    m = shutil.copytree(model, tmp_path / "m")  # a changed manifest, every checksum still right
    manifest = yaml.safe_load((m / "manifest.yaml").read_text())
    manifest["sparsity"] = {"default_alpha": 0.5}
    (m / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    assert generate(capsys, m)[0] == 0  # unpinned it loads ...
    code, err = generate(capsys, m, "--manifest-sha256", digest(model))  # ... pinned it does not
    assert code == 2 and "pinned" in err and len(err.strip().splitlines()) == 1


def test_info_checks_file_sizes_and_with_verify_checksums(capsys, model, tmp_path):
    """info reports a truncated file as one line (sizes are always checked) and a same-size corruption with
    --verify; with no directory it describes the embedded model."""
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"].endswith("default-model")
    m = shutil.copytree(model, tmp_path / "m")
    assert main(["info", str(m), "--verify"]) == 0
    capsys.readouterr()
    layer = m / "layer_000.safetensors"
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0x10
    layer.write_bytes(bytes(data))
    assert main(["info", str(m)]) == 0  # same size: only the checksum can tell
    capsys.readouterr()
    assert main(["info", str(m), "--verify"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "layer_000.safetensors fails its sha256" in err
    layer.write_bytes(bytes(data[:100]))
    assert main(["info", str(m)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "has 100 bytes" in err


def test_serve_port_clash_is_one_line(capsys, model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code = main(["serve", "--model", str(model), "--port", str(port), "--backend", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [f"edge-runtime: error: cannot listen on 127.0.0.1:{port}: "
                                                      f"Address already in use"]
    assert "serving" not in err
