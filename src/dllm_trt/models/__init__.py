"""Model adapters: load a checkpoint through transformers, expose its steps as export-friendly modules.

diffusion_gemma.py  the step (encoder pass and denoise step in one module) over transformers' layers
checkpoint.py       reading checkpoints: config, safetensors shards, content hash, the transformers model
presets.py          random checkpoints of the real architecture (tiny, small, full-width; -vision with a tower)
skeleton.py         the model without weights that export traces
offloaded.py        the reference one layer at a time, for parity in bounded memory
vision.py           the vision tower as an export-friendly module; its sizes read from the checkpoint
"""
