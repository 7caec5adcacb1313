"""The block-diffusion loop over one Step interface, and the Step backends (torch | onnxruntime | tensorrt).

A leaf library: the `generate` and `serve` verbs run it, and export, optimize and validate run graphs
through its Steps to measure them.

loop.py              transformers' generate() as backend-free tensor code; never changes with the backend
sampler.py           temperature schedule, sampling, entropy-bound acceptance, stopping, random draws
exponential_noise.py the sampler's Exp(1) noise, bit-exact with torch's generator, drawn ahead
kv_cache.py          the static KV cache the loop owns and backends bind by address; the fixed-layout one of a
                     scheduled request
prompt_chunks.py     how a long prompt is cut into encoder passes (the loop's rule, which `plan` counts)
scheduler.py         continuous batching: requests at different stages sharing step calls, each its own bits
tokenizer.py         the tokenizer and generation config beside the graphs; streamed text of canvases
images.py            a prompt's image spans and soft tokens, as each encoder pass takes them
image_inputs.py      images read, checked and processed as transformers' Gemma 4 processor does; placeholders
step.py              the Step interface; torch and onnxruntime steps
backends.py          open the Step for a backend over an artifact directory
ort_session.py       onnxruntime sessions with this machine's providers
cpu_variant.py       a runnable CPU copy of graphs onnxruntime cannot run as they are (stand-ins, bf16)
cpu_standins.py      Python stand-ins of the plugin ops, MoE and attention (their specified semantics)
tensorrt_step.py     the engines of `dllm-trt build` behind the Step interface
triton_step.py       the torch backend on CUDA: the MoE through the Triton kernels, a graphed denoise step
cuda_graphs.py       CUDA graphs as trtexec makes them: own stream, thread-local capture, cleared errors
"""
