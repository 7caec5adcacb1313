"""Image spans and placeholders: as transformers' processor writes them and its encoder masks them."""

import pytest
import torch
from PIL import Image
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import get_block_sequence_ids_for_mask

from dllm_trt.errors import DllmError
from dllm_trt.generation.image_inputs import expand_prompt_ids, expand_prompt_text, read_image
from dllm_trt.generation.images import PromptImages
from dllm_trt.generation.loop import left_pad

IMAGE, BOI, EOI = 99, 97, 98


def _batch():
    prompts = expand_prompt_ids([[5, IMAGE, 6, IMAGE], [IMAGE, 7]], iter([2, 3, 1]), BOI, IMAGE, EOI)
    return left_pad(prompts, 0)


def test_placeholders_expand_as_the_processor_writes_them():
    prompts = expand_prompt_ids([[5, IMAGE, 6], [IMAGE]], iter([2, 3]), BOI, IMAGE, EOI)
    assert prompts == [[5, BOI, IMAGE, IMAGE, EOI, 6], [BOI, IMAGE, IMAGE, IMAGE, EOI]]
    text = expand_prompt_text("a <img> b <img>", iter([1, 2]), "<img>", "<boi>", "<eoi>")
    assert text == "a <boi><img><eoi> b <boi><img><img><eoi>"


def test_spans_and_blocks_are_transformers_block_sequence_ids():
    ids, _ = _batch()
    embeds = torch.arange(6.0)[:, None].expand(6, 4)
    images = PromptImages.locate(ids, IMAGE, embeds, bidirectional=True)
    blocks = get_block_sequence_ids_for_mask((ids == IMAGE).long(), ids.device)
    for span in images.spans:
        assert set(blocks[span.row, span.start : span.stop].tolist()) == {span.block}
    assert [(s.row, s.stop - s.start) for s in images.spans] == [(0, 2), (0, 3), (1, 1)]
    whole = images.for_pass(0, ids.shape[1])
    assert torch.equal(whole.rows, torch.nonzero((ids == IMAGE).flatten()).flatten())  # row-major, as masked_scatter
    assert torch.equal(whole.embeds, embeds)
    causal = PromptImages.locate(ids, IMAGE, embeds, bidirectional=False)
    assert set(causal.for_pass(0, ids.shape[1]).block_ids.tolist()) == {-1}


def test_a_pass_never_cuts_an_image():
    ids, _ = _batch()
    images = PromptImages.locate(ids, IMAGE, torch.zeros(6, 4), bidirectional=True)
    first = images.spans[0]
    with pytest.raises(DllmError, match="would cut the image"):
        images.for_pass(0, first.start + 1)
    before = images.for_pass(0, first.start)  # a pass ending before the image takes none of it
    assert before.rows.numel() == 0


def test_soft_tokens_must_match_the_image_tokens():
    ids, _ = _batch()
    with pytest.raises(DllmError, match="6 image tokens but its images have 5 soft tokens"):
        PromptImages.locate(ids, IMAGE, torch.zeros(5, 4), bidirectional=True)


def test_bad_image_files_are_refused_in_one_line(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    frames = [Image.new("RGB", (8, 8), color) for color in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (20, 10), "green").save(tmp_path / "ok.png")
    for name, fragment in (("missing.png", "no such file"), ("text.png", "not an image file"),
                           ("clip.mp4", "is a video"), ("anim.gif", "2 frames")):  # fmt: skip
        with pytest.raises(DllmError, match=fragment):
            read_image(tmp_path / name)
    assert read_image(tmp_path / "ok.png").size == (20, 10)
