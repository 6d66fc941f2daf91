"""Room for what a backend builds beside the weights between tokens (TEAL's transposed weight copies, made
when a threshold is first set): checked against the memory free now before anything is built or any knob
is written, so that a setting that does not fit is refused and the decoder keeps the one it had. The load
plan (devices/planner.py) cannot count these copies: which projections get them is chosen after load."""

from __future__ import annotations

from edge_runtime.devices.planner import GB, WORKSPACE
from edge_runtime.errors import EdgeRuntimeError


class OutOfRoomError(EdgeRuntimeError):
    """What a setting would build does not fit the memory free now; nothing was changed."""


class RoomWarning(UserWarning):
    """A policy setting was applied without the part that did not fit (attention TEAL stays dense)."""


def require_room(needed: int, free: int, what: str) -> None:
    """Raise OutOfRoomError when `needed` bytes (plus the planner's workspace share: a copy that takes the last
    free byte would starve the step) exceed `free` bytes."""
    if needed > 0 and needed * WORKSPACE > free:
        raise OutOfRoomError(f"{what} need {_size(needed)} more memory but {_size(free)} is free now; the decoder "
                             f"keeps its setting (free memory, or use a smaller encoding)")


def _size(b: int) -> str:
    return f"{b / GB:.2f} GB" if b >= 0.1 * GB else f"{b / 1e6:.1f} MB" if b >= 1e5 else f"{b:,} bytes"
