"""dllm-trt: export DiffusionGemma to ONNX, fuse it, build TensorRT engines, and prove parity."""

__version__ = "0.1.0"
