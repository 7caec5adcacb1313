"""Parity against transformers: step level, per layer, whole generations; structured results.

A leaf library: export and optimize measure what they wrote with it, validate judges and reports.

compare.py            one comparison (relative error, argmax agreement) with tolerances per dtype; envelopes
reference.py          transformers' own forward passes, called as its generate() calls them; quantized alike
prompts.py            the prompts and lengths parity uses when the user gives none
step_parity.py        step parity on fresh random inputs (what export and optimize measure)
vision_parity.py      the vision graphs against transformers' tower, on fixed images made in code
vision_per_layer.py   every tower layer of a vision graph against transformers' same layer
generation_parity.py  every call of a real generation replayed on two backends; tokens end to end
layer_graphs.py       the step graph cut into per-layer pieces onnxruntime runs one at a time
layer_reference.py    transformers' layers hooked for the same boundaries
per_layer.py          every layer against transformers' same layer, in bounded memory
per_layer_report.py   the per-layer table and plot
golden.py             golden inputs and transformers' outputs in Polygraphy's formats, for stock polygraphy run
golden_commands.py    the polygraphy command lines of a golden folder and its README.md
"""
