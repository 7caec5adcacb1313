"""TensorRT engine verbs (`dllm-trt build`, `lint-trt`, `plan`) over the `trt/` plumbing.

stage.py           run(BuildOptions) -> BuildResult: plan (dry run), then build the one step engine into a
                   directory renamed into place, judged against its graph
lint.py            run(LintOptions) -> LintReport: the real parser's verdict, or the support table's;
                   interface, manifest and profile checks
parser_verdict.py  lint-trt's verdict from the installed library's own parser and builder
memory_plan.py     run(PlanOptions) -> MemoryPlan: weights, KV cache, activations per GPU, before any export
"""
