"""`dllm-trt validate`: artifacts judged against transformers (the `parity/` library), with a report.

stage.py   run(ValidateOptions) -> ValidateResult: the verb
report.py  report.json and report.md
"""

from dllm_trt.validate.stage import ValidateOptions, ValidateResult, run

__all__ = ["ValidateOptions", "ValidateResult", "run"]
