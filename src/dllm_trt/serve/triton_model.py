"""dllm-trt's decoupled Triton Python model: text_input [, max_tokens, stream, seed] -> text_output.

`dllm-trt triton-repo` copies this file into a model repository as `<model>/1/model.py`, beside the artifacts
it serves. Every bit of generation is dllm-trt's own (the model environment has dllm-trt installed): the
requests this instance receives are batched by generation.scheduler over the artifact's Step, and each
committed canvas goes back as one response when `stream` is true (one response with the whole text
otherwise). A `seed` gives what `dllm-trt generate --seed` gives. This is the contract Triton's OpenAI
frontend expects of a model it serves (text_input / max_tokens / stream -> text_output).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from dllm_trt.generation.backends import open_step
from dllm_trt.generation.loop import GenerationSettings
from dllm_trt.generation.scheduler import CanvasUpdate, Failed, Finished, Request, Scheduler, SchedulerOptions
from dllm_trt.generation.tokenizer import TextStream, generation_config, load_tokenizer


def _scalar(request, name: str, default: object) -> object:  # noqa: ANN001
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0]


def _text(piece: str) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse([pb_utils.Tensor("text_output", np.array([[piece.encode()]], dtype=np.object_))])


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.artifacts = Path(args["model_repository"]) / args["model_version"] / params["artifacts"]
        self.tokenizer = load_tokenizer(self.artifacts)
        self.generation_config = generation_config(self.artifacts)
        limits = SchedulerOptions(max_batch=int(params["max_batch"]), max_queue=int(params["max_queue"]),
                                  max_context=int(params["max_context"]))  # fmt: skip
        step = open_step(self.artifacts, params["backend"], params["device"])
        self.scheduler = Scheduler(step, limits).start()

    def execute(self, requests: list) -> None:
        for request in requests:
            self._submit(request)
        return None  # decoupled: the responses go out from the scheduler's thread

    def _submit(self, request) -> None:  # noqa: ANN001
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            prompt = self.tokenizer(_scalar(request, "text_input", b"").decode())["input_ids"]
            max_tokens = _scalar(request, "max_tokens", None)
            settings = GenerationSettings.from_generation_config(
                self.generation_config, max_new_tokens=None if max_tokens is None else int(max_tokens)
            )
            stream = bool(_scalar(request, "stream", False))
            text = TextStream(self.tokenizer)

            def listen(update: object) -> None:
                if sender.is_cancelled():
                    raise RuntimeError("cancelled by the client")  # the scheduler drops the request
                if isinstance(update, CanvasUpdate) and not update.provisional:
                    piece = text.push(update.tokens)
                    if stream and piece:
                        sender.send(_text(piece))
                elif isinstance(update, Finished):
                    sender.send(_text(text.push([], final=True) if stream else text.text()), flags=final)
                elif isinstance(update, Failed):
                    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(update.message)), flags=final)

            self.scheduler.submit(Request(tuple(prompt), settings, int(_scalar(request, "seed", 0))), listen)
        except Exception as exc:  # noqa: BLE001 (a bad request gets an error response, not a dead model)
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))), flags=final)

    def finalize(self) -> None:
        self.scheduler.stop()
