"""The model's weights uploaded once to the device, in their stored encodings, keyed by the host-side
objects of backends/weights.py so that the decoder's Layer/Linear/Norm arguments find their device twins."""

from __future__ import annotations

import numpy as np

from edge_runtime.backends.cuda_ops.common import DeviceMatrix, cupy
from edge_runtime.backends.weights import Layer, Linear, Norm, Weights
from edge_runtime.pack.quant import PackedTensor, quantize


class DeviceLinear:
    def __init__(self, lin: Linear):
        self.host = lin.w
        self.m = DeviceMatrix(lin.w)  # (N, K) as stored
        self.b = _vec(lin.b)  # (N,) fp32 or None
        self.t: DeviceMatrix | None = None  # (K, N) = W^T for TEAL's column skipping (made on demand)

    def transposed(self) -> DeviceMatrix:
        """W^T (K, N) for the TEAL kernel: skipped input channels are skipped rows. fp32, fp16 and int8 as
        stored (int8 with its per-output-row scales; backends/weights.column_layout, as the cpu backend keeps
        it); int4 and compressed rows widened and rounded to fp16 once (~3 significant digits)."""
        if self.t is None:
            h = self.host
            if h.encoding == "int8":
                self.t = DeviceMatrix.int8_columns(h)
            else:
                enc = h.encoding if h.encoding in ("fp32", "fp16") else "fp16"
                self.t = DeviceMatrix(quantize(np.ascontiguousarray(h.dequantize().T), enc))
        return self.t

    def transposed_bytes(self) -> int:
        """Device bytes transposed() makes: int8 values and fp16 row scales, fp32 or fp16 as stored, else fp16."""
        n, k = self.host.shape
        enc = self.host.encoding
        return n * k + 2 * n if enc == "int8" else n * k * (4 if enc == "fp32" else 2)

    def free(self) -> None:
        for m in (self.m, self.t):
            if m is not None:
                m.free()


class DeviceNorm:
    def __init__(self, n: Norm):
        self.w, self.b, self.eps = _vec(n.w), _vec(n.b), float(n.eps)  # (d,) fp32; b None for RMSNorm


class DeviceLayer:
    def __init__(self, layer: Layer):
        self.gate, self.up = DeviceLinear(layer.gate), (DeviceLinear(layer.up) if layer.up else None)
        self.down_t = DeviceMatrix(layer.down_t, column_kernel=True)  # (ffn_dim, d): one row per neuron
        self.down_host = layer.down_t
        self.down_b = _vec(layer.down_b)  # (d,) or None
        self.gate_signs = cupy().asarray(np.ascontiguousarray(layer.gate_signs, dtype=np.uint32))  # (N, ceil(d/32))


def _vec(v: np.ndarray | None):
    return None if v is None else cupy().asarray(np.ascontiguousarray(v, dtype=np.float32))


class DeviceWeights:
    """Device twins of every host weight object; `of(obj)` finds one."""

    def __init__(self, w: Weights):
        self._twins: dict[int, object] = {}
        self.embed = DeviceMatrix(w.embed)  # (vocab, d)
        self.pos_embed = DeviceMatrix(w.pos_embed) if w.pos_embed is not None else None
        self.lm_head = self.embed if w.lm_head is w.embed else DeviceMatrix(w.lm_head)  # (vocab, d)
        self.lm_head_host: PackedTensor = w.lm_head
        self.embed_host: PackedTensor = w.embed
        self.pos_embed_host: PackedTensor | None = w.pos_embed
        self.layers = []
        for layer in w.layers:
            dl = DeviceLayer(layer)
            self.layers.append(dl)
            for host in (layer.attn_norm, layer.ffn_norm, layer.attn_post_norm, layer.ffn_post_norm):
                if host is not None:
                    self._twins[id(host)] = DeviceNorm(host)
            for host in (layer.q, layer.k, layer.v, layer.o):
                self._twins[id(host)] = DeviceLinear(host)
            self._twins[id(layer.gate)] = dl.gate
            if layer.up is not None:
                self._twins[id(layer.up)] = dl.up
        self._twins[id(w.final_norm)] = DeviceNorm(w.final_norm)

    def of(self, host):
        return self._twins[id(host)]

    def free(self) -> None:
        for t in self._twins.values():
            if isinstance(t, DeviceLinear):
                t.free()
        for dl in self.layers:
            dl.down_t.free()
        self._twins.clear()
        self.layers = []
