"""The block-diffusion loop over one Step interface, and the Step backends (torch | onnxruntime | tensorrt).

A leaf library: the `generate` verb runs it, and export, optimize and validate run graphs through its
Steps to measure them.

loop.py              transformers' generate() as backend-free tensor code; never changes with the backend
sampler.py           temperature schedule, sampling, entropy-bound acceptance, stopping, random draws
exponential_noise.py the sampler's Exp(1) noise, bit-exact with torch's generator, drawn ahead
kv_cache.py          the static KV cache the loop owns and backends bind by address
images.py            a prompt's image spans and soft tokens, as each encoder pass takes them
image_inputs.py      images read, checked and processed as transformers' Gemma 4 processor does; placeholders
step.py              the Step interface; torch and onnxruntime steps
backends.py          open the Step for a backend over an artifact directory
ort_session.py       onnxruntime sessions with this machine's providers
cpu_variant.py       a runnable CPU copy of graphs onnxruntime cannot run as they are (stand-ins, bf16)
cpu_standins.py      Python stand-ins of the fused MoE ops (their specified semantics)
tensorrt_step.py     the engines of `dllm-trt build` behind the Step interface
"""
