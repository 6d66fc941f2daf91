"""Benchmark scripts that build a random model need torch and transformers, which a run-time install lacks: without
them they exit with one line naming the extra, not a ModuleNotFoundError traceback. A torch that fails to import
is put first on the path to stand for a missing one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [["scripts/bench_cpu.py", "--synthetic", "110m"],
                                  ["scripts/bench_prefill_onnx.py", "--rounds", "1"]])
def test_missing_torch_is_one_line_naming_the_extra(tmp_path, argv):
    shadow = tmp_path / "shadow" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('torch is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow.parent), str(ROOT)])}
    res = subprocess.run([sys.executable, *argv, "--workdir", str(tmp_path / "work")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "pip install '.[train]'" in res.stderr


def test_bench_serve_stops_when_its_daemon_exits_before_answering():
    """It waited 30 s for /health, then went on and ended in a ConnectError traceback (the daemon was still
    compiling its kernels); a daemon that dies is now named, and a slow one is waited for."""
    pytest.importorskip("httpx")
    from tests.helpers import load_script
    from tests.serve_support import free_port

    bench = load_script("bench_serve")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(SystemExit, match="exited with status 3"):
        bench.wait_for_daemon(proc, f"http://127.0.0.1:{free_port()}", limit_s=30)


def test_every_scripts_help_describes_it_in_whole_sentences():
    """--help printed the docstring's first line, which stopped mid-sentence in five scripts ("... alternating
    rounds in one process, so the ratio"); it prints the first paragraph. The docstrings are read without running
    the scripts (some import torch)."""
    import ast

    from edge_runtime.cli_args import description

    checked = 0
    for path in sorted((ROOT / "scripts").glob("*.py")):
        source = path.read_text()
        assert "__doc__.splitlines()[0]" not in source, path.name
        if "description=description(__doc__)" not in source:
            continue
        text = description(ast.get_docstring(ast.parse(source), clean=False))
        assert text.endswith("."), f"{path.name}: {text!r}"
        checked += 1
    assert checked >= 15
    assert description("First line goes\n    on here.\n\n    Usage: x\n") == "First line goes on here."
