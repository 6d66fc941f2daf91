"""Every kernels/*.cu compiles under NVRTC as CuPy's RawModule will compile it, for Jetson Orin (sm_87) and
Hopper (sm_90), with no GPU. Skips where neither the nvidia-cuda-nvrtc wheel (the test extra installs it on
x86-64 Linux) nor a CUDA toolkit is there, unless EDGE_RUNTIME_REQUIRE_NVRTC=1 (CI) makes that a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_runtime.backends.cuda_ops.common import source_text
from tests.nvrtc import compile_source, find_cuda_include, find_nvrtc

KERNELS = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "kernels").glob("*.cu"))


@pytest.fixture(scope="module")
def nvrtc():
    lib, include = find_nvrtc(), find_cuda_include()
    if lib is None or include is None:
        if os.environ.get("EDGE_RUNTIME_REQUIRE_NVRTC") == "1":
            pytest.fail(f"NVRTC {'found' if lib else 'missing'}, CUDA headers {include or 'missing'}")
        pytest.skip("NVRTC or the CUDA headers are not installed (pip install nvidia-cuda-nvrtc; a CUDA toolkit)")
    return lib, include


def test_every_kernel_file_is_found():
    assert len(KERNELS) >= 10 and {"sparse_ffn.cu", "gemv.cu", "attention.cu"} <= set(KERNELS)


@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
@pytest.mark.parametrize("name", KERNELS)
def test_kernel_compiles_under_nvrtc(nvrtc, name, arch):
    lib, include = nvrtc
    rc, log = compile_source(lib, source_text(name), name, ["-std=c++17", f"-arch={arch}", f"-I{include}"])
    assert rc == 0, f"{name} for {arch}:\n{log}"
