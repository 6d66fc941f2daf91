"""scripts/generate_profile.py on the cpu backend at --smoke sizes: the profile it writes loads and holds
positive measurements; a bad --base, power mode, backend or folder fails before anything is written and
leaves an existing profile as it was. (The cuda backend's run is in test_cuda_scripts.py.)"""

from __future__ import annotations

import math
import os

import pytest
import yaml

from edge_runtime.atomic_write import atomic_write, atomic_write_text
from edge_runtime.backends import cuda_available
from edge_runtime.devices.profile import load_profile
from tests.helpers import load_script

gen = load_script("generate_profile")


def _measurements(path):
    return yaml.safe_load(path.read_text())["measurements"]


def test_cpu_profile_loads_with_positive_measurements(tmp_path):
    out = tmp_path / "this-vm.yaml"
    gen.main(["--name", "this-vm", "--out", str(out), "--backend", "cpu", "--smoke"])
    prof = load_profile(out)
    assert prof.name == "this-vm" and prof.to_dict()["kind"] == "cpu"
    m = _measurements(out)
    assert m["backend"] == "cpu" and m["smoke"] is True
    assert set(m["sparse_ffn_ms_by_density"]) == set(gen.DENSITIES)
    figures = [m["copy_gbs"], m["launch_us"], *m["gemv_gbs_by_n"].values(), *m["sparse_ffn_ms_by_density"].values()]
    assert all(math.isfinite(v) and v > 0 for v in figures)
    assert 0 < prof.to_dict()["performance"]["bandwidth_efficiency"] <= 1


def test_base_profile_keeps_its_modes_and_takes_the_measured_efficiency(tmp_path):
    out = tmp_path / "nano.yaml"
    gen.main(["--name", "my-nano", "--out", str(out), "--base", "jetson-orin-nano-8gb", "--power-mode", "7w",
              "--backend", "cpu", "--smoke"])
    base, mine = load_profile("jetson-orin-nano-8gb").to_dict(), load_profile(out).to_dict()
    assert mine["name"] == "my-nano" and mine["power_modes"] == base["power_modes"]
    m = _measurements(out)
    best = m["gemv_gbs_by_n"][max(m["gemv_gbs_by_n"])]
    seven = next(pm for pm in base["power_modes"] if pm["name"] == "7W")
    assert mine["performance"]["bandwidth_efficiency"] == pytest.approx(min(1.0, best / seven["memory_bandwidth_gbs"]),
                                                                        abs=2e-3)


@pytest.mark.parametrize("argv, message", [
    (["--base", "jetson-orin-nano-8gb", "--backend", "cpu"], "this machine is detected as cpu-generic"),
    (["--base", "jetson-orin-nano-8gb", "--power-mode", "7W", "--backend", "cuda"], "the board is in power mode 15W"),
    (["--base", "jetson-orin-nano-8gb", "--backend", "cpu"], "measure with --backend cuda"),
])
def test_base_is_refused_unless_measured_on_that_board_mode_and_backend(tmp_path, monkeypatch, argv, message):
    """This VM's CPU figures were written as a measured Orin Nano profile (measured: true) without a word."""
    from edge_runtime.devices.detect import Detection

    if "cpu-generic" not in message:
        monkeypatch.setattr(gen, "detect", lambda: Detection("jetson-orin-nano-8gb", "15W", "device tree", {}))
    else:
        monkeypatch.setattr(gen, "detect", lambda: Detection("cpu-generic", None, "no Jetson device tree", {}))
    out = tmp_path / "nano.yaml"
    with pytest.raises(SystemExit) as e:
        gen.main(["--name", "my-nano", "--out", str(out), *argv])
    assert message in str(e.value) and not out.exists()


def test_base_mode_defaults_to_the_one_the_board_is_in(monkeypatch):
    from edge_runtime.devices.detect import Detection

    monkeypatch.setattr(gen, "detect", lambda: Detection("jetson-orin-nano-8gb", "7W", "device tree", {}))
    assert gen.check_base_is_here("jetson-orin-nano-8gb", None, "cuda") == "7W"
    assert gen.check_base_is_here("jetson-orin-nano-8gb", "7w", "cuda") == "7w"


def test_base_by_path_or_a_profile_made_from_it_is_the_same_board(tmp_path, monkeypatch):
    """Names differ, the board does not: a --base given as a path, or detection finding the user's own profile
    (written with --base, in EDGE_RUNTIME_PROFILES) before the shipped one."""
    from edge_runtime.devices.detect import Detection

    mine = tmp_path / "my-nano.yaml"
    mine.write_text(yaml.safe_dump({**load_profile("jetson-orin-nano-8gb").to_dict(), "name": "my-nano"}))
    monkeypatch.setattr(gen, "detect", lambda: Detection("jetson-orin-nano-8gb", "15W", "device tree", {}))
    assert gen.check_base_is_here(str(mine), None, "cuda") == "15W"
    monkeypatch.setenv("EDGE_RUNTIME_PROFILES", str(tmp_path))
    monkeypatch.setattr(gen, "detect", lambda: Detection("my-nano", "15W", "device tree", {}))
    assert gen.check_base_is_here("jetson-orin-nano-8gb", None, "cuda") == "15W"
    with pytest.raises(gen.EdgeRuntimeError, match="detected as"):
        gen.check_base_is_here("jetson-orin-nano-8gb-super", None, "cuda")
    monkeypatch.setattr(gen, "detect", lambda: Detection("jetson-orin-nano-8gb", None, "device tree", {}))
    with pytest.raises(gen.EdgeRuntimeError, match="name it with --power-mode"):
        gen.check_base_is_here("jetson-orin-nano-8gb", None, "cuda")


@pytest.mark.parametrize("argv, message", [
    (["--base", "no-such-board"], "no device profile 'no-such-board'"),
    (["--base", "jetson-orin-nano-8gb", "--power-mode", "99W"], "has no power mode '99W'"),
    pytest.param(["--backend", "cuda"], "needs CuPy and a CUDA GPU",
                 marks=pytest.mark.skipif(cuda_available(), reason="a GPU is here")),
])
def test_bad_arguments_leave_the_existing_profile(tmp_path, capsys, argv, message):
    out = tmp_path / "board.yaml"
    out.write_text("name: the good one\n")
    with pytest.raises(SystemExit) as e:
        gen.main(["--name", "x", "--out", str(out), "--smoke", *argv])
    assert message in str(e.value)
    assert out.read_text() == "name: the good one\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["board.yaml"]


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="is not a directory"):
        gen.main(["--name", "x", "--out", str(tmp_path / "no" / "board.yaml"), "--backend", "cpu", "--smoke"])


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and oct(path.stat().st_mode & 0o777) == "0o644"


def test_a_full_disk_names_the_file_that_was_not_written(tmp_path, capsys, monkeypatch):
    """write() into an open file raises ENOSPC with no file name, so the CLI's one line said only "No space left
    on device"; the error now names the file being replaced, which is left as it was."""
    import errno

    from edge_runtime import cli
    from edge_runtime.cli import main

    path = tmp_path / "summary.json"
    atomic_write_text(path, "old")

    def fill_the_disk(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as caught:
        atomic_write(path, fill_the_disk)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]

    monkeypatch.setitem(cli.COMMANDS, "info", lambda _args: atomic_write(path, fill_the_disk))
    assert main(["info"]) == 2  # a command that writes a file, as the CLI reports its failure
    assert capsys.readouterr().err.strip() == f"edge-runtime: error: No space left on device ({path})"
