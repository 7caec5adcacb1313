"""What `dllm-trt generate` gives for the prompt the serving tests send: computed once for the server and
the Triton tests."""

import pytest

PROMPT, SEED, MAX_TOKENS = "def fibonacci(n):", 7, 64


@pytest.fixture(scope="session")
def generated(trained_ort_cpu) -> str:
    """`dllm-trt generate OPTIMIZED --prompt PROMPT --seed 7 --max-new-tokens 64`'s text (its run(), in-process)."""
    from dllm_trt import runtime

    options = runtime.GenerateOptions(trained_ort_cpu, prompts=(PROMPT,), seed=SEED, max_new_tokens=MAX_TOKENS)
    text = runtime.run(options).text[0]
    assert text.strip(), "generate gave no text: the comparison would be empty"
    return text
