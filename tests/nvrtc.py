"""NVRTC, the compiler CuPy's RawModule uses, called through ctypes: kernels/*.cu can be compiled exactly as the
loader hands them over (one text, headers inlined) on a machine with no GPU. nvcc alone is not enough: it
searches the system's include directories, NVRTC does not."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from pathlib import Path


def find_nvrtc() -> ctypes.CDLL | None:
    """libnvrtc from the nvidia-cuda-nvrtc wheel, CUDA_PATH or the loader's path; None when there is none."""
    candidates = []
    try:
        import nvidia

        for root in nvidia.__path__:  # cu13/lib (CUDA 13 wheels), cuda_nvrtc/lib (CUDA 12 wheels)
            for pattern in ("cu*/lib/libnvrtc.so*", "cuda_nvrtc/lib/libnvrtc.so*"):
                candidates += sorted(Path(root).glob(pattern))
    except ImportError:
        pass
    if os.environ.get("CUDA_PATH"):
        candidates += sorted(Path(os.environ["CUDA_PATH"]).glob("lib64/libnvrtc.so*"))
    if found := ctypes.util.find_library("nvrtc"):
        candidates.append(Path(found))
    for c in candidates:
        if "builtins" in c.name:
            continue
        try:
            return ctypes.CDLL(str(c))
        except OSError:
            continue
    return None


def find_cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (cuda_fp16.h): CUDA_PATH, beside nvcc, or /usr/local/cuda*."""
    roots = [os.environ.get("CUDA_PATH")]
    if nvcc := shutil.which("nvcc"):
        roots.append(str(Path(nvcc).resolve().parents[1]))
    roots += sorted(str(p) for p in Path("/usr/local").glob("cuda*"))
    for r in filter(None, roots):
        if (Path(r) / "include" / "cuda_fp16.h").is_file():
            return Path(r) / "include"
    return None


def compile_source(lib: ctypes.CDLL, source: str, name: str, options: list[str]) -> tuple[int, str]:
    """(NVRTC result code, compile log) for one program; 0 is NVRTC_SUCCESS."""
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)
    if rc != 0:
        return rc, "nvrtcCreateProgram failed"
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        return rc, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
