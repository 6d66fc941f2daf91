"""edge-runtime: an LLM runtime for Jetson Orin that decodes with predicted activation sparsity."""

__version__ = "0.1.0"

from edge_runtime.errors import EdgeRuntimeError

__all__ = ["EdgeRuntimeError", "__version__"]
