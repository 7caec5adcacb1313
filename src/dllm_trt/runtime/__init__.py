"""The block-diffusion loop over one Step interface (torch | onnxruntime | tensorrt backends)."""
