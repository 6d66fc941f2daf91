"""Where numba keeps the compiled cpu kernels, chosen before numba is imported.

numba caches beside the source (edge_runtime/backends/__pycache__) when that folder is writable, else in the
user's cache folder (~/.cache/numba). On a robot the package is often installed read-only and the service
runs as a user without a writable home: numba then keeps no cache at all, and every start compiled the
kernels again (45-50 s on the 2-core development machine, a review found) without a word. So when
NUMBA_CACHE_DIR is unset and neither place can be written, it is set to a folder of this user's own under
/var/tmp (kept across reboots) or the temp directory: the kernels compile once. The folder must be this
user's and closed to others, since numba loads pickled code from it; otherwise nothing is set.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

BACKENDS = Path(__file__).resolve().parent / "backends"  # the kernels' sources: numba's in-tree cache is here


def _writable(path: Path) -> bool:
    """Whether path, or the nearest folder above it that exists (numba creates the rest), can be written."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.access(path, os.W_OK)


def user_cache() -> Path:
    """numba's user-wide cache folder on Linux: $XDG_CACHE_HOME/numba, else ~/.cache/numba."""
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "numba"


def private_folder(root: Path) -> Path | None:
    """root/edge-runtime-numba-UID, made if missing; None unless it is this user's and closed to others."""
    folder = root / f"edge-runtime-numba-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = folder.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return folder


def fallback_cache_dir(writable: Callable[[Path], bool] = _writable, roots: tuple[Path, ...] | None = None
                       ) -> Path | None:
    """The folder to name in NUMBA_CACHE_DIR when numba would keep no cache, else None."""
    if writable(BACKENDS / "__pycache__") or writable(user_cache()):
        return None
    for root in roots or (Path("/var/tmp"), Path(tempfile.gettempdir())):
        if root.is_dir() and (folder := private_folder(root)) is not None:
            return folder
    return None


if "NUMBA_CACHE_DIR" not in os.environ and (found := fallback_cache_dir()) is not None:
    os.environ["NUMBA_CACHE_DIR"] = str(found)
