"""OpenBLAS's idle-worker spin (edge_runtime/blas_spin.py): set by importing edge_runtime before numpy, kept when
the environment has it, reported as too late when numpy came first; the cpu backend warns only where it decodes
on several threads without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

import edge_runtime.backends.cpu as cpu

PROBE = ("import json, os, sys\n{first}\nimport edge_runtime.blas_spin as b\n"
         "print(json.dumps([os.environ.get('OPENBLAS_THREAD_TIMEOUT'), b.EFFECTIVE]))")


def _probe(first: str, env_value: str | None) -> list:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if env_value is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_importing_edge_runtime_first_sets_the_spin_before_numpy_loads_openblas():
    assert _probe("import edge_runtime", None) == ["20", True]


def test_a_value_already_in_the_environment_is_kept():
    assert _probe("import edge_runtime", "8") == ["8", True]


def test_numpy_imported_first_is_reported_as_too_late():
    assert _probe("import numpy", None) == ["20", False]


@pytest.mark.parametrize("effective, threads, warns", [(False, 2, True), (True, 2, False), (False, 1, False)])
def test_cpu_backend_warns_only_when_several_threads_meet_spinning_blas(monkeypatch, effective, threads, warns):
    import edge_runtime
    monkeypatch.setattr(cpu, "BLAS_SPIN_SET", effective)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        edge_runtime.load(None, profile=None, backend="cpu", threads=threads)
    spin = [w for w in caught if "OPENBLAS_THREAD_TIMEOUT" in str(w.message)]
    assert len(spin) == (1 if warns else 0)
