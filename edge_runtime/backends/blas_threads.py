"""How many threads the cpu backend's BLAS calls (prefill and evaluation passes) may use.

OpenBLAS workers busy-wait for a while after each call before they sleep. A small model decodes on one
thread; next to the spinning workers of its own prefill it ran at 1,750 instead of 3,000 tokens/s on the
2-core development machine with another process busy, and on a robot those workers take cores from every
other process. So batched calls use the backend's thread count, not BLAS's default of every core (and
edge_runtime/blas_spin.py shortens the spin itself).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from threadpoolctl import ThreadpoolController

_controller: ThreadpoolController | None = None  # scans the loaded BLAS libraries once, on first use


def blas_threads(n: int) -> AbstractContextManager:
    """A context in which BLAS calls use at most n threads (about 10 us to enter and leave)."""
    global _controller
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.limit(limits=max(1, int(n)), user_api="blas")
