"""validate with images: the honest vision graphs pass, layer by layer and end to end; one tower layer's
norm 5% off fails at that layer."""

from perturb import scaled_copy

from dllm_trt import validate

VISION_LAYER_NORM = "model.encoder.vision_tower.encoder.layers.{}.post_attention_layernorm.weight"


def test_per_layer_passes_the_honest_graphs_and_names_the_tower_layers(tiny_vision_export, tiny_vision_ckpt):
    result = validate.run(validate.ValidateOptions(tiny_vision_export, tiny_vision_ckpt, per_layer=True, quiet=True))
    assert result.passed, result.failures
    layers = [layer["layer"] for layer in result.report["per_layer"]["layers"]]
    assert layers[:3] == ["vision 0", "vision 1", "vision head"] and layers[3:] == [0, 1, "head"]
    calls = result.report["per_layer"]["calls"]
    assert calls[0] == "encoder pass with images"  # the merge of the soft tokens is the step's embedding block


def test_a_vision_layer_norm_five_percent_off_fails_at_that_layer(tiny_vision_export, tiny_vision_ckpt, tmp_path):
    """The tower's part of --per-layer (validate runs it before the step's layers) on a perturbed copy."""
    from dllm_trt.manifest import read_manifest
    from dllm_trt.parity.vision_per_layer import tower_per_layer

    bad = scaled_copy(tiny_vision_export, tmp_path / "bad", VISION_LAYER_NORM.format(1), 1.05)
    verdicts = tower_per_layer(bad, tiny_vision_ckpt, read_manifest(bad))
    assert [v.passed for v in verdicts] == [True, False, True]  # each piece from the reference's input: only layer 1
    failing = verdicts[1]
    assert (failing.layer, failing.first_failing_block()) == ("vision 1", "attention norm")
    assert failing.worst("attention norm").value > 100 * failing.worst("attention norm").bound  # 5e-2 against 1e-4


def test_validate_replays_a_generation_with_images_on_the_optimized_graphs(tiny_vision_optimized, tiny_vision_ckpt):
    options = validate.ValidateOptions(tiny_vision_optimized, tiny_vision_ckpt, seeds=(0,), max_new_tokens=8,
                                       quiet=True)  # fmt: skip
    result = validate.run(options)
    assert result.passed, result.failures
    names = [c["name"] for c in result.report["random_input_parity"]["comparisons"]]
    assert "vision 70 soft tokens" in names and "encoder prompt with images key.0" in names
