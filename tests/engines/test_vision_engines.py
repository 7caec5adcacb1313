"""vision.engine beside step.engine: built by TensorRT for RTX for DGX Spark from the tiny vision preset."""

import json

import pytest

from dllm_trt.trt.trt_library import TENSORRT_RTX, installed


@pytest.fixture(scope="module")
def built(tiny_vision_export, tmp_path_factory):
    if not installed(TENSORRT_RTX):
        pytest.skip("TensorRT for RTX is not installed (the rtx extra): no engine can be built here")
    from dllm_trt import optimize
    from dllm_trt.engines import stage

    root = tmp_path_factory.mktemp("vision-engines")
    optimize.run(optimize.OptimizeOptions(tiny_vision_export, root / "trt", "trt", "bf16", parity="none", quiet=True))
    return stage.run(stage.BuildOptions(root / "trt", root / "engines", "dgx-spark", quiet=True)), root


def test_vision_and_step_engines_build_for_dgx_spark(built):
    result, root = built
    engines = result.info["engines"]
    assert set(engines) == {"step", "vision-70"}
    assert (root / "engines" / "vision-70.engine").stat().st_size > 0
    vision = engines["vision-70"]
    # head size 72 in bf16: TensorRT for RTX's builder fuses the tower's attention (its layer list says so)
    assert vision["network"]["attention"] == 2 and vision["fused_attention_kernels"] == 2
    manifest = json.loads((root / "engines" / "manifest.json").read_text())
    assert manifest["build"]["engines"] == {"step": "step.engine", "vision-70": "vision-70.engine"}
    profiles = result.info["graph_profiles"]
    assert profiles["vision-70"]["vision"]["pixel_values"][2][0] == 8  # images per call, at most
    assert profiles["step"]["step"]["image_embeds"][0][0] == 0  # text passes and denoise steps take none
