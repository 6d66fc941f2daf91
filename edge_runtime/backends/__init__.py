"""Backends: the same op set over different devices. `create_backend` is the one dispatch point."""

from __future__ import annotations

from edge_runtime.errors import EdgeRuntimeError, install_extra

BACKENDS = ("auto", "cpu", "cuda")


def cuda_available() -> bool:
    try:
        import cupy
    except ImportError:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except cupy.cuda.runtime.CUDARuntimeError:
        return False


def resolve_backend(name: str) -> str:
    """The backend `name` stands for: "auto" is "cuda" where CuPy sees a GPU, else "cpu"."""
    if name not in BACKENDS:
        raise EdgeRuntimeError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return ("cuda" if cuda_available() else "cpu") if name == "auto" else name


def require_cuda(what: str = "backend 'cuda'", instead: str = "use --backend cpu"):
    """The cupy module, where CuPy and a CUDA GPU are there; else EdgeRuntimeError saying what is missing
    and, after installing the cuda extra, what else one could do."""
    if not cuda_available():
        raise EdgeRuntimeError(f"{what} needs CuPy and a CUDA GPU; none was found ({install_extra('cuda')} "
                               f"for CUDA 12 or '.[cuda13]' for CUDA 13 on a machine with one, or {instead})")
    import cupy

    return cupy


def create_backend(name: str, model, max_context: int, threads: int | None = None):
    """A backend holding `model`'s weights and a KV cache of `max_context` positions; threads: the cpu
    backend's compute threads (None: the cores numpy's BLAS would use)."""
    if resolve_backend(name) == "cuda":
        require_cuda()
        from edge_runtime.backends.cuda import CudaBackend

        return CudaBackend(model, max_context)
    from edge_runtime.backends.cpu import CpuBackend

    return CpuBackend(model, max_context, threads)
