"""The vision graph's 2-D RoPE and attention fuse, and the fused graph computes what the export computes."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from vision_case import TINY_VISION_SOFT_TOKENS

from dllm_trt.contract import vision_graph
from dllm_trt.generation.image_inputs import image_processor, process_images
from dllm_trt.manifest import read_manifest
from dllm_trt.optimize.context import PassContext
from dllm_trt.optimize.pipeline import PIPELINE, clean_up, op_counts
from dllm_trt.optimize.vision import graph_runs
from dllm_trt.optimize.vision_fusions import fuse_axial_rotary
from dllm_trt.parity.vision_parity import fixed_images

NAME = vision_graph(TINY_VISION_SOFT_TOKENS)


@pytest.fixture(scope="module")
def fused(tiny_vision_export, tmp_path_factory):
    """The vision graph through every pass the pipeline runs on it for onnxruntime on CPU in fp32, with the counts
    (for TensorRT in fp32 the attention becomes the DllmAttention plugin: no fused fp32 kernel; tests/engines)."""
    manifest = read_manifest(tiny_vision_export)
    model = ir.load(str(tiny_vision_export / f"{NAME}.onnx"))
    counts = {}
    for step in PIPELINE:
        for name, run in graph_runs(step, {NAME: model}):
            counts[step.name] = run(model, PassContext("ort-cpu", "fp32", name, manifest["model"]))
            clean_up(model)
    path = tmp_path_factory.mktemp("vision-fused") / "fused.onnx"
    ir.save(model, str(path), external_data="fused.onnx.data")
    return counts, op_counts(model), path, manifest["model"]["vision"]["num_layers"]


def test_norms_rope_and_attention_fuse_in_every_layer(fused):
    counts, ops, _, layers = fused
    assert counts["fuse_rms_norm"] == 7 * layers + 1  # 4 sandwich norms and q/k/v norms per layer, the embedder's
    assert counts["fuse_rotary_embedding"] == 2 * layers  # q and k of every layer
    assert ops["RotaryEmbedding"] == 4 * layers  # one per half-head axis
    assert counts["fuse_attention"] == ops["Attention"] == layers
    assert "Softmax" not in ops and "Neg" not in ops  # no eager attention or rotate-half left


def test_fused_graph_computes_the_exported_one(fused, tiny_vision_export, tmp_path):
    _, _, path, _ = fused
    inputs = process_images(fixed_images(), image_processor(tmp_path, 16, 3, TINY_VISION_SOFT_TOKENS))
    feeds = {"pixel_values": inputs.pixel_values.numpy(), "pixel_position_ids": inputs.position_ids.numpy()}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only our rewrite is tested
    expected = ort.InferenceSession(str(tiny_vision_export / f"{NAME}.onnx"), options).run(None, feeds)[0]
    actual = ort.InferenceSession(str(path), options).run(None, feeds)[0]
    assert np.abs(actual - expected).max() / np.abs(expected).max() < 1e-5


def test_the_step_rope_is_not_axial(tiny_vision_export):
    manifest = read_manifest(tiny_vision_export)
    step = ir.load(str(tiny_vision_export / "step.onnx"))
    assert fuse_axial_rotary(step, PassContext("trt", "fp32", "step", manifest["model"])) == 0
