"""A process forked after numba started its GNU OpenMP threads (as loading a cpu runtime does) cannot run the cpu
kernels: numba ends the child ("Terminating: fork() called from a process already using GNU OpenMP, this is
unsafe") at its first parallel kernel. multiprocessing's default start method on Linux is fork: a Pool of workers
died and its map waited forever. Such a child gets a clear error instead, before it takes any lock. (A child
forked while another thread of the parent generated also inherits that runtime's lock held, with any threading
layer: spawn or forkserver avoid both.) Imports no numba: the cuda backend needs none.
"""

from __future__ import annotations

import os
import sys

from edge_runtime.errors import EdgeRuntimeError

_forked_after_threads = False


def _after_fork_in_child() -> None:
    global _forked_after_threads
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    if parallel is None or not getattr(parallel, "_is_initialized", False):
        return  # no thread pool yet: the child starts its own
    try:
        layer = parallel.threading_layer()
    except ValueError:
        layer = None
    omp = sys.modules.get("numba.np.ufunc.omppool")
    gnu = getattr(omp, "openmp_vendor", "GNU") == "GNU"  # Intel's and LLVM's OpenMP survive fork, as tbb does
    _forked_after_threads = _forked_after_threads or (layer == "omp" and gnu)


os.register_at_fork(after_in_child=_after_fork_in_child)


def check_not_forked() -> None:
    if _forked_after_threads:
        raise EdgeRuntimeError("this process was forked after edge-runtime started its cpu kernels, and their "
                               "OpenMP threads do not survive fork(): start worker processes with multiprocessing's "
                               "'spawn' or 'forkserver' method (multiprocessing.get_context('spawn'))")
