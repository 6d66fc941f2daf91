"""WINA: TEAL's magnitude criterion weighted by the weights each input channel multiplies.

TEAL keeps input channel i of a projection W (N, K) when |x_i| >= t; WINA (weight-informed neuron
activation) keeps it when |x_i| * ||W[:, i]||_2 >= t, so a small input on a heavy column survives and a
large one on a light column does not: it bounds the output error ||W[:, i] x_i|| a skipped channel causes.
Both run as one criterion, |x_i| * s_i >= t, with s = 1 (TEAL) or s = the column norms (WINA): the
backends read s from the decode state, so switching criterion rewrites an array and recaptures nothing.

Column norms are computed at conversion (pack/colnorms.py: `<projection>_colnorm` vectors, from the fp32
weights) and, for packs converted before them, from the stored weights when WINA is first asked for.
"""

from __future__ import annotations

from edge_runtime.errors import EdgeRuntimeError

CRITERIA = ("teal", "wina")


def check_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise EdgeRuntimeError(f"unknown TEAL criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    return criterion
