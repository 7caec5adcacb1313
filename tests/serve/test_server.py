"""`dllm-trt serve` on the trained checkpoint's optimized graphs, as a process, through the official `openai`
client: the text is `dllm-trt generate`'s with the same seed, streamed or not; 16 concurrent streams each
get their one-at-a-time text; bad requests get OpenAI-style 4xx and the server goes on; a client leaving
mid-stream is cancelled; the server stops on SIGTERM and leaves nothing behind. Loopback only, every
wait bounded."""

import concurrent.futures
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the tests talk to the server with the official client (dev extra)")
pytest.importorskip("fastapi", reason="the serve extra is not installed")

MODEL = "pycode-tiny"
PROMPT = "def fibonacci(n):"  # and seed 7, 64 tokens: what the `generated` fixture generated
CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"  # noqa: E501


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


class Server:
    def __init__(self, artifacts: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.shm_before = shm()
        template = log.with_name("chat.jinja")
        template.write_text(CHAT_TEMPLATE)
        command = [sys.executable, "-m", "dllm_trt.cli", "serve", str(artifacts), "--port", str(self.port),
                   "--chat-template", str(template), "--max-batch", "16", "--max-queue", "32"]  # fmt: skip
        self.log = log.open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=300)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log.read_text()
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.25)
        raise AssertionError(f"the server was not ready in 180 s: {log.read_text()}")

    def get(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.status, response.read().decode()

    def post(self, path: str, body: bytes | dict) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            connection.request("POST", path, data, {"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            connection.close()

    def metric(self, name: str) -> float:
        text = self.get("/metrics")[1]
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def server(trained_ort_cpu, tmp_path_factory):
    server = Server(trained_ort_cpu, tmp_path_factory.mktemp("serve") / "server.log")
    yield server
    if server.process.poll() is None:  # a failed test left it running
        server.process.kill()
        server.process.wait(30)


def test_models_health_and_metrics(server):
    assert [m.id for m in server.client.models.list().data] == [MODEL]
    assert server.get("/health") == (200, '{"status":"ok"}')
    metrics = server.get("/metrics")[1]
    for name in ("dllm_trt_requests_total", "dllm_trt_step_seconds", "dllm_trt_queue_depth",
                 "dllm_trt_denoise_steps_per_canvas", "dllm_trt_generated_tokens_total"):  # fmt: skip
        assert name in metrics


def test_text_is_generates_with_the_same_seed_streamed_or_not(server, generated):
    expected = generated  # PROMPT, seed 7, 64 tokens
    whole = server.client.completions.create(model=MODEL, prompt=PROMPT, seed=7, max_tokens=64)
    assert whole.choices[0].text == expected
    assert whole.usage.completion_tokens == 64 and whole.choices[0].finish_reason == "length"
    chunks = list(server.client.completions.create(model=MODEL, prompt=PROMPT, seed=7, max_tokens=64, stream=True,
                                                   stream_options={"include_usage": True}))  # fmt: skip
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(texts) == expected
    assert len(texts) == 2  # one chunk per committed canvas (64 tokens = two canvases of 32)
    assert chunks[-1].usage.completion_tokens == 64 and not chunks[-1].choices


def test_chat_goes_through_the_template(server, trained_ort_cpu):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Write a stack class."}]
    reply = server.client.chat.completions.create(model=MODEL, messages=messages, seed=3, max_tokens=32)
    tokenizer = AutoTokenizer.from_pretrained(str(trained_ort_cpu))
    tokenizer.chat_template = CHAT_TEMPLATE
    prompt = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"]  # fmt: skip
    assert "<user> Write a stack class.\n<assistant> " == tokenizer.decode(prompt)
    same = server.client.completions.create(model=MODEL, prompt=prompt, seed=3, max_tokens=32)
    assert reply.choices[0].message.content == same.choices[0].text and reply.choices[0].message.role == "assistant"
    streamed = server.client.chat.completions.create(model=MODEL, messages=messages, seed=3, max_tokens=32,
                                                     stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.choices[0].message.content


def _knobs(i: int) -> dict:
    """16 requests that drift apart: two lengths, three step budgets, their own prompt and seed."""
    return dict(prompt=f"{PROMPT} # {i}" if i % 2 else f"class Stack{i}:", seed=100 + i, max_tokens=32 * (1 + i % 2),
                extra_body={"max_denoising_steps": 4 + i % 3})  # fmt: skip


def test_16_concurrent_streams_each_get_their_one_at_a_time_text(server):
    before = server.metric('dllm_trt_step_rows_bucket{le="8.0",phase="denoise"}')
    calls_before = server.metric('dllm_trt_step_rows_count{phase="denoise"}')

    def stream(i: int) -> str:
        chunks = server.client.completions.create(model=MODEL, stream=True, **_knobs(i))
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(stream, range(16)))
    batched_calls = server.metric('dllm_trt_step_rows_count{phase="denoise"}') - calls_before
    wide = batched_calls - (server.metric('dllm_trt_step_rows_bucket{le="8.0",phase="denoise"}') - before)
    assert wide > 0, "no denoise call held more than 8 requests: the streams were not batched"
    alone = [server.client.completions.create(model=MODEL, **_knobs(i)).choices[0].text for i in range(16)]
    assert together == alone
    assert len(set(together)) == 16


def test_provisional_canvases_are_marked_and_leave_the_text_alone(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    body = dict(model=MODEL, prompt=PROMPT, seed=7, max_tokens=64, stream=True, stream_provisional=True)
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    lines = connection.getresponse().read().decode().split("\n\n")
    connection.close()
    assert lines[-2] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-2]]
    provisional = [c["choices"][0]["provisional"] for c in chunks if "provisional" in c["choices"][0]]
    assert all(c["choices"][0]["text"] == "" for c in chunks if "provisional" in c["choices"][0])
    steps = chunks[-1]["dllm_trt"]["steps_per_canvas"]
    assert len(provisional) == sum(s - 1 for s in steps)  # every step but the one that commits
    assert [p["canvas"] for p in provisional] == sorted(p["canvas"] for p in provisional)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == server.client.completions.create(model=MODEL, prompt=PROMPT, seed=7, max_tokens=64).choices[0].text


BAD = [
    (b'{"model": "pycode-tiny", "prompt": ', 400, "invalid_json"),
    ({"model": "gpt-4", "prompt": PROMPT}, 404, "model_not_found"),
    ({"model": MODEL, "prompt": list(range(3, 503))}, 400, "context_length_exceeded"),  # 500 + 64 > 512
    ({"model": MODEL, "prompt": PROMPT, "max_tokens": 0}, 400, None),
    ({"model": MODEL, "prompt": PROMPT, "max_tokens": 10**12}, 400, "context_length_exceeded"),
    ({"model": MODEL, "prompt": PROMPT, "n": 2}, 400, "unsupported_parameter"),
    ({"model": MODEL, "prompt": PROMPT, "temperature": 0.7}, 400, "unsupported_parameter"),
    ({"model": MODEL, "prompt": PROMPT, "logit_bias": {"5": 1}}, 400, "unsupported_parameter"),
    ({"model": MODEL, "prompt": PROMPT, "stream_provisional": True}, 400, "unsupported_parameter"),
    ({"model": MODEL, "prompt": PROMPT, "colour": "blue"}, 400, "extra_forbidden"),
    ({"model": MODEL, "prompt": [5, 1 << 20]}, 400, None),
    ({"model": MODEL, "prompt": ""}, 400, None),
    ({"model": MODEL, "prompt": PROMPT, "t_min": 0.9, "t_max": 0.5}, 400, None),
    ({"model": MODEL, "prompt": PROMPT, "seed": -1}, 400, None),
]


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    for body, status, code in BAD:
        got, error = server.post("/v1/completions", body)
        assert got == status, (body, error)
        assert error["error"]["message"] and error["error"]["type"] == "invalid_request_error", error
        assert code is None or error["error"]["code"] == code, error
    got, error = server.post("/v1/chat/completions", {"model": MODEL, "messages": []})
    assert got == 400 and error["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="n > 1 is not supported"):
        server.client.completions.create(model=MODEL, prompt=PROMPT, n=2)
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="gpt-4", prompt=PROMPT)
    assert server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, seed=1).choices[0].text
    assert server.metric('dllm_trt_requests_total{status="refused"}') >= len(BAD) + 3


def test_a_client_leaving_mid_stream_is_cancelled(server):
    cancelled = server.metric('dllm_trt_requests_total{status="cancelled"}')
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    body = dict(model=MODEL, prompt=PROMPT, seed=1, max_tokens=448, stream=True)  # 14 canvases
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")  # the first canvas arrived
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + 60
    while server.metric('dllm_trt_requests_total{status="cancelled"}') == cancelled:
        assert time.monotonic() < deadline, "the request was not cancelled within 60 s"
        time.sleep(0.2)
    assert server.metric("dllm_trt_active_requests") == 0  # its row, and its cache, are gone
    assert server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, seed=2).choices[0].text


def test_200_requests_32_at_a_time_keep_memory_flat(server):
    """32 concurrent streams (16 generate, 16 queue), 200 short requests: all answered, and the server's
    resident memory after the last 150 within a few MB of where the first 50 left it."""
    import psutil

    process = psutil.Process(server.process.pid)

    def short(i: int) -> int:
        chunks = server.client.completions.create(model=MODEL, prompt=f"x = {i}", seed=i, max_tokens=32, stream=True,
                                                  extra_body={"max_denoising_steps": 1})  # fmt: skip
        return sum(len(c.choices[0].text) for c in chunks if c.choices)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert all(n > 0 for n in pool.map(short, range(50)))
        warm = process.memory_info().rss
        assert all(n > 0 for n in pool.map(short, range(50, 200)))
    grown = (process.memory_info().rss - warm) / 2**20
    print(f"server RSS {warm / 2**20:.0f} MB after 50 requests, {grown:+.1f} MB after 150 more")
    assert grown < 16, f"the server grew {grown:.1f} MB over 150 requests"
    assert server.metric("dllm_trt_active_requests") == 0 and server.metric("dllm_trt_queue_depth") == 0


def test_sigterm_stops_the_server_and_leaves_nothing_behind(server):
    import psutil

    process = psutil.Process(server.process.pid)
    children = process.children(recursive=True)
    server.process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal: the process ends as killed by SIGTERM
    assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    server.log.close()
    log = Path(server.log.name).read_text()
    assert re.search(r"dllm-trt: stopped; \d+ requests served", log), log  # the scheduler stopped first
    assert not [c for c in children if c.is_running()]
    assert shm() <= server.shm_before, shm() - server.shm_before
    with pytest.raises(OSError):
        server.get("/health")
