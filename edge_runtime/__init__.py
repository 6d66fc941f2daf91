"""edge-runtime: an LLM runtime for Jetson Orin that decodes with predicted activation sparsity.

    import edge_runtime
    with edge_runtime.load() as rt:                 # the embedded default model
        print(rt.generate("The robot", max_new_tokens=32, deadline_s=0.5).text)
"""

from edge_runtime import (
    blas_spin,  # noqa: F401  (first: before anything loads numpy and OpenBLAS)
    numba_cache,  # noqa: F401  (before numba reads NUMBA_CACHE_DIR)
)
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.version import __version__

__all__ = ["EdgeRuntimeError", "Runtime", "__version__", "load"]


def __getattr__(name: str):
    # The runtime (and with it tokenizers) is imported on first use, so that the layers below it
    # (edge_runtime.pack, edge_runtime.devices, ...) import without the runtime's dependencies.
    if name in ("Runtime", "load"):
        from edge_runtime import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
