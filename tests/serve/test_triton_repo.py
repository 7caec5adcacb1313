"""`dllm-trt triton-repo`: the repository it writes, and the real `tritonserver` of nvidia-pytriton serving it.

The server runs from a model environment of its own (numpy 1.x, which the bundled Python backend needs;
.ci/run makes it at .venv-triton): the test builds the repository for the trained checkpoint's optimized
graphs, starts tritonserver on loopback, streams a generation through HTTP `generate_stream`, and
compares it with `dllm-trt generate` under the same seed. Every wait is bounded.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from dllm_trt.errors import DllmError
from dllm_trt.serve import triton_repo

REPO = Path(__file__).resolve().parents[2]
TRITON_ENV = Path(os.environ.get("DLLM_TRT_TRITON_ENV", REPO / ".venv-triton"))
PROMPT = "def fibonacci(n):"


def _pytriton() -> Path | None:
    found = sorted(TRITON_ENV.glob("lib/python3.*/site-packages/pytriton/tritonserver/bin/tritonserver"))
    return found[0].parents[1] if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_the_repository_holds_a_decoupled_model_over_the_artifacts(trained_ort_cpu, tmp_path):
    result = triton_repo.run(triton_repo.TritonRepoOptions(trained_ort_cpu, tmp_path / "repo", max_batch=8))
    repo, name = tmp_path / "repo", result.model_name
    assert name == "pycode-tiny" and result.backend == "onnxruntime"
    config = (repo / name / "config.pbtxt").read_text()
    for line in ('backend: "python"', "decoupled: true", 'name: "text_input" data_type: TYPE_STRING',
                 'name: "text_output" data_type: TYPE_STRING', "max_batch_size: 8", "kind: KIND_CPU",
                 'key: "backend" value { string_value: "onnxruntime" }'):  # fmt: skip
        assert line in config
    assert (repo / name / "1" / "model.py").read_text() == triton_repo.MODEL_FILE.read_text()
    for file in ("manifest.json", "step.onnx", "tokenizer.json", "generation_config.json"):
        assert (repo / name / "1" / "artifacts" / file).read_bytes() == (trained_ort_cpu / file).read_bytes()
    assert "generate_stream" in (repo / "README.md").read_text()
    assert not (repo / f"{name}_step").exists()  # no engines, no plan model
    with pytest.raises(DllmError, match="not empty"):
        triton_repo.run(triton_repo.TritonRepoOptions(trained_ort_cpu, repo))
    with pytest.raises(DllmError, match="not a Triton model name"):
        triton_repo.run(triton_repo.TritonRepoOptions(trained_ort_cpu, tmp_path / "other", model_name="a b"))


def test_artifacts_without_a_tokenizer_are_refused(trained_ort_cpu, tmp_path):
    artifacts = shutil.copytree(trained_ort_cpu, tmp_path / "artifacts", ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(DllmError, match="no tokenizer.json"):
        triton_repo.run(triton_repo.TritonRepoOptions(artifacts, tmp_path / "repo"))
    assert not (tmp_path / "repo").exists()


def test_the_plan_config_carries_every_engine_input_and_the_profiles(trained_ort_cpu):
    """The tensorrt_plan config of engines, from a graph's real interface (an engine directory's manifest holds
    the same graph I/O) and the profiles `build` records. Config only: nothing here can load an engine."""
    manifest = json.loads((trained_ort_cpu / "manifest.json").read_text())
    profiles = {"step": {"step": {"input_ids": [[1, 1], [2, 32], [4, 4096]]}}}
    config = triton_repo._plan_config("m_step", manifest, {"library": "tensorrt", "graph_profiles": profiles})
    assert 'platform: "tensorrt_plan"' in config and "max_batch_size: 0" in config
    for value in manifest["graphs"]["step"]["inputs"] + manifest["graphs"]["step"]["outputs"]:
        assert f'name: "{value["name"]}"' in config
    assert 'name: "past_key.0" data_type: TYPE_FP32 dims: [ -1, 2, -1, 48 ]' in config
    assert 'name: "temperature" data_type: TYPE_FP32 dims: [ -1 ]' in config
    assert "#   input_ids: [1, 1] / [2, 32] / [4, 4096]" in config


@pytest.mark.skipif(_pytriton() is None, reason=f"no nvidia-pytriton model environment at {TRITON_ENV} (.ci/run "
                    "makes it; or set DLLM_TRT_TRITON_ENV)")  # fmt: skip
def test_tritonserver_streams_what_generate_gives(trained_ort_cpu, generated, tmp_path):
    server_dir = _pytriton()
    site = server_dir.parents[1]
    repo = triton_repo.run(triton_repo.TritonRepoOptions(trained_ort_cpu, tmp_path / "repo")).output
    # The Python backend as pytriton ships it, with the stub for the environment's Python beside it (the
    # stub finds its libraries through LD_LIBRARY_PATH, so the environment itself stays as installed).
    # The stub links libpython3.X.so: the model environment's own (its LIBDIR), not another Python's of the
    # same minor version (Debian's 3.11.2 beside pyenv's 3.11.7 lacks symbols the stdlib modules need).
    query = "import sys, sysconfig; print(sys.version_info[1], sysconfig.get_config_var('LIBDIR'))"
    python, libdir = subprocess.run([str(TRITON_ENV / "bin" / "python"), "-c", query], capture_output=True,
                                    text=True, check=True).stdout.split()  # fmt: skip
    backends = tmp_path / "backends"
    shutil.copytree(server_dir / "backends" / "python", backends / "python")
    stub = server_dir / "python_backend_stubs" / f"3.{python}" / "triton_python_backend_stub"
    shutil.copy2(stub, backends / "python")
    port = _free_port()
    env = dict(os.environ, PATH=f"{TRITON_ENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
               LD_LIBRARY_PATH=f"{libdir}{os.pathsep}{site / 'nvidia_pytriton.libs'}")  # fmt: skip
    env.pop("PYTHONPATH", None)  # the model environment has its own dllm-trt
    command = [str(server_dir / "bin" / "tritonserver"), "--model-repository", str(repo), "--backend-directory",
               str(backends), "--http-address", "127.0.0.1", "--http-port", str(port), "--allow-grpc", "false",
               "--allow-metrics", "false", "--exit-timeout-secs", "20"]  # fmt: skip
    shm_before = _shm()
    log = (tmp_path / "tritonserver.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "tritonserver.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "tritonserver not ready in 240 s"
            try:
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        body = json.dumps({"text_input": PROMPT, "max_tokens": 64, "stream": True, "seed": 7}).encode()
        request = urllib.request.Request(f"{url}/v2/models/pycode-tiny/generate_stream", body, method="POST")
        with urllib.request.urlopen(request, timeout=300) as response:
            events = [json.loads(line[len(b"data: ") :]) for line in response if line.startswith(b"data: ")]
        assert all("error" not in e for e in events), events
        pieces = [e["text_output"] for e in events if e["text_output"]]
        assert "".join(pieces) == generated  # PROMPT, seed 7, 64 tokens
        assert len(pieces) == 2  # one response per committed canvas
        children = _children(server.pid)
        assert children, "no Python backend stub process: what served the model?"
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=90)
        log.close()
    assert code == 0, (tmp_path / "tritonserver.log").read_text()[-4000:]
    assert not [pid for pid in children if _alive(pid)]
    assert _shm() <= shm_before, _shm() - shm_before


def _children(pid: int) -> list[int]:
    import psutil

    return [child.pid for child in psutil.Process(pid).children(recursive=True)]


def _alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
