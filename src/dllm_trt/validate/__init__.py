"""Parity against transformers: step level, per layer, end to end; structured results and reports.

stage.py              run(ValidateOptions) -> ValidateResult: the `validate` verb
compare.py            one comparison (relative error, argmax agreement) with tolerances per dtype
reference.py          transformers' own forward passes, called as its generate() calls them
export_parity.py      step parity on fresh random inputs (what export and optimize measure)
generation_parity.py  every call of a real generation replayed on two backends; tokens end to end
report.py             report.json and report.md
"""

from dllm_trt.validate.stage import ValidateOptions, ValidateResult, run

__all__ = ["ValidateOptions", "ValidateResult", "run"]
