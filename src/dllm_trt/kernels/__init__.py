"""Custom GPU kernels (Triton). Every module here imports without Triton installed."""
