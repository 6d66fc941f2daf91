"""A process forked after numba started its GNU OpenMP threads cannot run the cpu kernels: numba ends the child
("Terminating: fork() called from a process already using GNU OpenMP, this is unsafe") at its first parallel
kernel, and a child forked while another thread of the parent generated inherits that runtime's lock held.
multiprocessing's default start method on Linux is fork: a Pool of workers died and its map waited forever.
Such a child gets a clear error instead, before it takes any lock. Imports no numba: the cuda backend needs none.
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
    _forked_after_threads = _forked_after_threads or layer == "omp"  # tbb and workqueue survive fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def check_not_forked() -> None:
    if _forked_after_threads:
        raise EdgeRuntimeError("this process was forked after edge-runtime ran its cpu kernels, and their OpenMP "
                               "threads do not survive fork(): start worker processes with multiprocessing's "
                               "'spawn' or 'forkserver' method (multiprocessing.get_context('spawn'))")
