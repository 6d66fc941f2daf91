"""How long OpenBLAS's idle worker threads busy-wait, set before numpy loads OpenBLAS.

After each call OpenBLAS's workers spin for 2^28 cycles (about 0.1 s here) before they sleep. After a prefill
they held the second core while a two-thread decode wanted it: a 110M-shaped model decoded at 6.2 instead of
4.7 ms per token on the 2-core development machine until they gave up (and on a robot they burn a core after
every prompt). OpenBLAS reads OPENBLAS_THREAD_TIMEOUT (log2 of the cycles, 4 to 30) once, when it is loaded,
so this module sets it from the package's __init__, before anything imports numpy; a value already in the
environment is kept. Where numpy was imported first (an application's `import numpy` above `import
edge_runtime`) the setting comes too late: EFFECTIVE is False and the cpu backend says so once.
"""

from __future__ import annotations

import os
import sys

SPIN_LOG2_CYCLES = "20"  # about 0.4 ms: longer than the gaps between one prefill's BLAS calls
EFFECTIVE = "OPENBLAS_THREAD_TIMEOUT" in os.environ or "numpy" not in sys.modules
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", SPIN_LOG2_CYCLES)
