"""Image generation token for token with transformers, on a configuration no test uses.

A random checkpoint with other vision widths than every preset (3 tower layers of hidden 96, 3 query
heads of 32 over 1 key/value head, standardize on; a 3-layer text model), exported with vision graphs
at 70 and 140 soft tokens, then optimized for onnxruntime CPU in fp32. For each seed and each prompt
(1 image with text before and after; 3 images of different aspect ratios with text between), the
generate verb's result over the exported and the optimized graphs is compared with transformers'
generate(input_ids, pixel_values, image_position_ids, mm_token_type_ids) after torch.manual_seed(seed).

    python bench/check_image_generation.py [--seeds 0,1,2,3] [--max-new-tokens 24] [--workdir DIR]

Prints one row per case and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from dllm_trt import export, optimize, runtime
from dllm_trt.generation.image_inputs import expand_prompt_ids, image_processor, process_images
from dllm_trt.generation.loop import GenerationSettings, left_pad
from dllm_trt.models.checkpoint import load_model
from dllm_trt.models.presets import generation_config_for, randomize_, save_checkpoint
from dllm_trt.parity.generation_parity import reference_generate
from dllm_trt.parity.vision_parity import fixed_images

TEXT = dict(vocab_size=400, hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, global_head_dim=48, num_global_key_value_heads=1, sliding_window=16,
            num_experts=6, top_k_experts=2, moe_intermediate_size=32, max_position_embeddings=4096,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            use_bidirectional_attention="vision")  # fmt: skip
TOWER = dict(model_type="gemma4_vision", hidden_size=96, intermediate_size=160, num_hidden_layers=3,
             num_attention_heads=3, num_key_value_heads=1, head_dim=32, standardize=True)  # fmt: skip
IMAGE, BOI, EOI = 399, 397, 398
# (name, prompt with IMAGE once per image, the fixed images it takes, max_soft_tokens)
PROMPTS = [
    ("1 image, text before and after", [[5, 17, 23, IMAGE, 42, 8, 9]], [2], 140),
    ("3 images of different aspect ratios, text between", [[11, IMAGE, 12, 13, IMAGE, 14, IMAGE, 15]], [0, 1, 2], 70),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dllm-check-image-generation"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    shutil.rmtree(args.workdir, ignore_errors=True)
    ckpt, onnx_dir, optimized = args.workdir / "ckpt", args.workdir / "onnx", args.workdir / "ort-fp32"
    config = DiffusionGemmaConfig(text_config=TEXT, vision_config=TOWER, canvas_length=8, image_token_id=IMAGE,
                                  boi_token_id=BOI, eoi_token_id=EOI)  # fmt: skip
    torch.manual_seed(7)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    randomize_(model, seed=7, tower=True)
    model.generation_config = generation_config_for("tiny")
    save_checkpoint(model, ckpt, tower=True)
    start = time.perf_counter()
    result = export.run(export.ExportOptions(ckpt, onnx_dir, max_soft_tokens=(70, 140), quiet=True))
    print(f"export with parity: {time.perf_counter() - start:.0f} s, parity failed: {result.parity_failed}")
    start = time.perf_counter()
    optimize.run(optimize.OptimizeOptions(onnx_dir, optimized, "ort-cpu", "fp32", parity="final", quiet=True))
    print(f"optimize ort-cpu fp32 with parity: {time.perf_counter() - start:.0f} s")
    reference = load_model(ckpt)
    settings = GenerationSettings.from_generation_config(reference.generation_config.to_dict(),
                                                         max_new_tokens=args.max_new_tokens)  # fmt: skip
    pictures = fixed_images()
    for index, image in enumerate(pictures):
        image.save(args.workdir / f"image{index}.png")
    failures = 0
    print("| prompt | seed | artifact | token-exact | new tokens |")
    print("|---|---:|---|---|---:|")
    for name, prompts, order, soft in PROMPTS:
        inputs = process_images([pictures[i] for i in order], image_processor(ckpt, 16, 3, soft))
        ids, mask = left_pad(expand_prompt_ids(prompts, iter(inputs.counts), BOI, IMAGE, EOI), 0)
        multimodal = dict(pixel_values=inputs.pixel_values, image_position_ids=inputs.position_ids,
                          mm_token_type_ids=(ids == IMAGE).long())  # fmt: skip
        for seed in seeds:
            expected, _ = reference_generate(reference, ids, mask, settings, seed, images=multimodal)
            for artifact in (onnx_dir, optimized):
                options = runtime.GenerateOptions(
                    artifact, prompt_ids=tuple(tuple(p) for p in prompts), seed=seed, max_soft_tokens=soft,
                    images=tuple(args.workdir / f"image{i}.png" for i in order), max_new_tokens=args.max_new_tokens,
                )  # fmt: skip
                ours = runtime.run(options)
                same = ours.sequences == expected.sequences.tolist()
                failures += not same
                print(f"| {name} | {seed} | {artifact.name} | {'yes' if same else '**NO**'} | "
                      f"{ours.stats['new_tokens']} |", flush=True)  # fmt: skip
    print(f"\n{failures} case(s) differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
