"""`dllm-trt triton-repo ARTIFACTS -o REPO`: `run(TritonRepoOptions)`; a Triton Inference Server model repository.

What it writes (data, and one small model.py that calls dllm-trt's own scheduler and loop)::

    REPO/README.md                 how to deploy it: image, environment, ports, scale-out
    REPO/NAME/config.pbtxt         a decoupled Python model: text_input [, max_tokens, stream, seed] -> text_output
    REPO/NAME/1/model.py           serve/triton_model.py, as it is
    REPO/NAME/1/artifacts/         the artifact directory (graphs, manifest, tokenizer), hard-linked or copied
    REPO/NAME_step/config.pbtxt    engines only: the step engine as a `tensorrt_plan` model, its inputs and
    REPO/NAME_step/1/model.plan    outputs with the engine's profiles as dims (config only, see the README)

The Python model runs the step in-process: onnxruntime for export/optimize output (CPU), the project's
TensorRT runner for engines (GPU), because the engines carry the DllmMoE plugin, a Python IPluginV3 that
Triton's TensorRT backend cannot load.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from dllm_trt.contract import STAGE_BUILD
from dllm_trt.errors import DllmError
from dllm_trt.generation.scheduler import SchedulerOptions
from dllm_trt.manifest import atomic_output, read_manifest

MODEL_FILE = Path(__file__).with_name("triton_model.py")
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8"}  # fmt: skip


@dataclass(frozen=True)
class TritonRepoOptions:
    artifacts: Path
    output: Path
    model_name: str | None = None  # None: the checkpoint directory's name
    instances: int = 1  # model instances per server (each batches its own requests)
    max_batch: int = SchedulerOptions.max_batch
    max_queue: int = SchedulerOptions.max_queue
    max_context: int = SchedulerOptions.max_context
    force: bool = False


@dataclass
class TritonRepoResult:
    output: Path
    model_name: str
    backend: str
    files: list[str]


def _model_config(name: str, options: TritonRepoOptions, backend: str) -> str:
    device = "cuda" if backend == "tensorrt" else "cpu"
    kind = "KIND_MODEL" if backend == "tensorrt" else "KIND_CPU"  # the engine runner places itself on its GPU
    params = dict(artifacts="artifacts", backend=backend, device=device, max_batch=options.max_batch,
                  max_queue=options.max_queue, max_context=options.max_context)  # fmt: skip
    parameters = ",\n".join(f'  {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items())
    return f"""# dllm-trt: generation as a decoupled Python model (Triton's OpenAI frontend serves it as it is).
# Requests that arrive together or while others run are batched by dllm-trt's scheduler inside the model,
# so Triton's own batcher stays off; max_batch_size > 0 only gives the inputs the [1, 1] shape the OpenAI
# frontend sends.
name: "{name}"
backend: "python"
max_batch_size: {options.max_batch}
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "seed" data_type: TYPE_UINT64 dims: [ 1 ] optional: true }}
]
output [
  {{ name: "text_output" data_type: TYPE_STRING dims: [ -1 ] }}
]
instance_group [ {{ kind: {kind} count: {options.instances} }} ]
parameters [
{parameters}
]
"""


def _plan_config(name: str, manifest: dict, build_info: dict) -> str:
    """The step engine as a tensorrt_plan model: every input and output, dynamic axes as -1, the profiles' ranges."""
    graph = manifest["graphs"]["step"]
    lines = [f"# dllm-trt: the step engine ({build_info.get('library')} {build_info.get('tensorrt_version')}, "
             f"{build_info.get('gpu', {}).get('name')}). Config only: it loads where the DllmMoE plugin is"
             " available to Triton's TensorRT backend as a shared library; see ../README.md."]  # fmt: skip
    for profile, inputs in build_info.get("graph_profiles", {}).get("step", {}).items():
        lines.append(f"# profile '{profile}' (min / opt / max):")
        lines += [f"#   {tensor}: {' / '.join(map(str, shapes))}" for tensor, shapes in inputs.items()]
    lines += [f'name: "{name}"', 'platform: "tensorrt_plan"', "max_batch_size: 0"]

    def block(kind: str, values: list[dict]) -> None:
        entries = []
        for value in values:
            dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in value["shape"]) or "1"
            reshape = " reshape: { shape: [ ] }" if not value["shape"] else ""
            entries.append(f'  {{ name: "{value["name"]}" data_type: {TRITON_TYPES[value["dtype"]]} '
                           f"dims: [ {dims} ]{reshape} }}")  # fmt: skip
        lines.append(f"{kind} [\n" + ",\n".join(entries) + "\n]")

    block("input", graph["inputs"])
    block("output", graph["outputs"])
    lines.append("instance_group [ { kind: KIND_GPU count: 1 } ]")
    return "\n".join(lines) + "\n"


def _readme(name: str, backend: str, engines: bool) -> str:
    if engines:
        step = (
            f"`{name}_step` holds the engine as a `tensorrt_plan` model, config only: the engine's MoE layers are "
            "dllm-trt's DllmMoE plugin, a Python IPluginV3, which Triton's TensorRT backend cannot load, so the "
            f"Python model runs the engine in-process through dllm-trt's own runner (backend `{backend}`). The plan "
            "model serves once the plugin exists as a shared library (`--backend-config=tensorrt,plugins=...`); "
            f"until then start the server with `--model-control-mode=explicit --load-model={name}`."
        )
    else:
        step = f"The step runs in-process in the Python model (backend `{backend}`: onnxruntime on the CPU)."
    return f"""# Triton model repository for `{name}` (written by `dllm-trt triton-repo`)

`{name}` is a decoupled Python model with the contract of Triton's LLM models: inputs `text_input` (string),
optional `max_tokens` (int32), `stream` (bool) and `seed` (uint64); output `text_output` (string). With
`stream` true each committed canvas is one response; otherwise one
response holds the whole text. A `seed` gives exactly what `dllm-trt generate --seed` gives. The requests
an instance receives are batched by dllm-trt's scheduler inside the model (requests at different denoise
steps share one step call); `parameters` in `config.pbtxt` set its limits (`max_batch`, `max_queue`,
`max_context`). {step}

## Run it

The model environment is a Python with dllm-trt installed (`pip install dllm-trt`, with `torch` and, for
engines, `tensorrt` and a CUDA build of torch) and **numpy 1.x**: the Python backend stub shipped with
Triton 2.51 returns wrong shapes and crashes on strings with numpy 2.

- NGC image (GPU): `docker run --gpus all -p8000:8000 -p8001:8001 -p8002:8002 -v $PWD:/models
  nvcr.io/nvidia/tritonserver:<yy.mm>-py3 bash -c "pip install dllm-trt 'numpy<2' && tritonserver
  --model-repository=/models"`.
- Without Docker, on a CPU machine: `pip install nvidia-pytriton==0.7.0 'numpy<2' dllm-trt` into one
  virtual environment (pytriton bundles `tritonserver` 2.51 with the Python backend), copy
  `pytriton/tritonserver/python_backend_stubs/3.X/triton_python_backend_stub` into
  `pytriton/tritonserver/backends/python/` (X: that Python's minor version), then with the environment's
  `bin` first on `PATH`: `tritonserver --model-repository REPO --backend-directory
  .../pytriton/tritonserver/backends`. Another environment for the model: set `EXECUTION_ENV_PATH` in
  `parameters`.

Ports: 8000 HTTP (`POST /v2/models/{name}/generate_stream` streams Server-Sent Events; `generate` needs
`stream` false), 8001 gRPC (streaming inference), 8002 Prometheus metrics. Triton's OpenAI-compatible
frontend (`python3 openai_frontend/main.py --model-repository REPO --tokenizer ARTIFACTS`) serves `{name}`
unchanged.

    curl -N -X POST localhost:8000/v2/models/{name}/generate_stream \\
      -d '{{"text_input": "def fibonacci(n):", "max_tokens": 64, "stream": true, "seed": 0}}'

## Scale out

One instance batches up to `max_batch` requests on its device; `instance_group.count` adds instances
(each with its own copy of the weights and its own batch) where memory allows. Beyond one machine, run
one server per GPU or node behind a load balancer: every instance is stateless between requests, so
Kubernetes (a Deployment of the NGC image with this repository on a volume, readiness on
`/v2/health/ready`) or KServe's Triton runtime scale it by replicas, and Triton's metrics on port 8002
(`nv_inference_queue_duration_us`, `nv_inference_request_success`) drive an autoscaler.
"""


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the filesystem allows (graphs can be tens of GB), a copy elsewhere."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _place(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_dir():
            _place(path, target / path.name)
        else:
            _link_or_copy(path, target / path.name)


def run(options: TritonRepoOptions) -> TritonRepoResult:
    artifacts = options.artifacts
    manifest = read_manifest(artifacts)
    if not (artifacts / "tokenizer.json").is_file():
        raise DllmError(f"{artifacts} has no tokenizer.json: a Triton model takes text (text_input); export a "
                        "checkpoint that has a tokenizer")  # fmt: skip
    name = options.model_name or Path(manifest["checkpoint"]["path"]).name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise DllmError(f"model name '{name}' is not a Triton model name (letters, digits, _ . -); pass --model-name")
    for field in ("instances", "max_batch", "max_queue", "max_context"):
        if getattr(options, field) < 1:
            raise DllmError(f"--{field.replace('_', '-')} must be a positive integer")
    engines = manifest.get("stage") == STAGE_BUILD
    backend = "tensorrt" if engines else "onnxruntime"
    with atomic_output(options.output, force=options.force) as tmp:
        model = tmp / name
        (model / "1").mkdir(parents=True)
        (model / "config.pbtxt").write_text(_model_config(name, options, backend))
        shutil.copy2(MODEL_FILE, model / "1" / "model.py")
        _place(artifacts, model / "1" / "artifacts")
        if engines:
            from dllm_trt.contract import ENGINE_FILES, STEP
            from dllm_trt.trt.build_info import read_build_info

            plan = tmp / f"{name}_step"
            (plan / "1").mkdir(parents=True)
            (plan / "config.pbtxt").write_text(_plan_config(f"{name}_step", manifest, read_build_info(artifacts)))
            _link_or_copy(artifacts / ENGINE_FILES[STEP], plan / "1" / "model.plan")
        (tmp / "README.md").write_text(_readme(name, backend, engines))
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return TritonRepoResult(options.output, name, backend, files)
