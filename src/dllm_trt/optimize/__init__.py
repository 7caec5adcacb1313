"""ONNX pass pipeline per target (trt, ort-cuda, ort-cpu)."""
