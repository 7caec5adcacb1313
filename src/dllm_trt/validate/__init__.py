"""Parity against transformers: step level, per layer, end to end; structured results and reports."""
