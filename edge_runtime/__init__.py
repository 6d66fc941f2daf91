"""edge-runtime: an LLM runtime for Jetson Orin that decodes with predicted activation sparsity.

    import edge_runtime
    with edge_runtime.load() as rt:                 # the embedded default model
        print(rt.generate("The robot", max_new_tokens=32, deadline_s=0.5).text)
"""

__version__ = "0.1.0"

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.runtime import Runtime, load

__all__ = ["EdgeRuntimeError", "Runtime", "__version__", "load"]
