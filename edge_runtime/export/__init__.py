"""Exports of a packed model to other runtimes (ONNX for ONNX Runtime and TensorRT prefill)."""
