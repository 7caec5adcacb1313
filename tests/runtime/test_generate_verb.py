"""generate with images as a user meets it: text and id prompts, and every bad input refused in one line."""

import json
import shutil

import pytest
from PIL import Image
from vision_case import TINY_VISION_SOFT_TOKENS

from dllm_trt.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "wide.png"
    Image.new("RGB", (160, 90), (200, 40, 10)).save(path)
    return path


def _word_tokenizer(vocab: int, special: dict[int, str]):  # noqa: ANN202
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {special.get(i, f"w{i}"): i for i in range(vocab)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(special.values()))
    return tokenizer


def test_text_prompt_places_images_where_the_image_token_is(tiny_vision_export, picture, tmp_path, capsys):
    artifacts = tmp_path / "with-tokenizer"
    shutil.copytree(tiny_vision_export, artifacts)
    vision = json.loads((artifacts / "manifest.json").read_text())["model"]["vision"]
    special = {vision["boi_token_id"]: "<boi>", vision["eoi_token_id"]: "<eoi>", vision["image_token_id"]: "<image>"}
    _word_tokenizer(512, special).save(str(artifacts / "tokenizer.json"))
    common = ["--image", picture, "--max-soft-tokens", TINY_VISION_SOFT_TOKENS, "--max-new-tokens", 8, "--json"]
    code, out, err = run_cli(capsys, "generate", artifacts, "--prompt", "w5 <image> w7", *common)
    assert code == 0, err
    by_text = json.loads(out)
    code, out, err = run_cli(capsys, "generate", artifacts, "--prompt-ids", f"5,{vision['image_token_id']},7", *common)
    assert code == 0, err
    by_ids = json.loads(out)
    assert by_text["sequences"] == by_ids["sequences"]
    count = by_ids["image_soft_tokens"][0]
    prompt = by_ids["sequences"][0][: count + 4]
    assert prompt == [5, vision["boi_token_id"], *[vision["image_token_id"]] * count, vision["eoi_token_id"], 7]


def _bad_inputs(tmp_path, picture):
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    many = ["--image", picture] * 63  # 63 images of 66 soft tokens: more than the tiny context of 4096
    return [
        ("text-only", ["--image", picture], "text-only checkpoint"),
        ("video", ["--image", tmp_path / "clip.mp4"], "is a video"),
        ("not an image", ["--image", tmp_path / "notes.png"], "not an image file"),
        ("missing", ["--image", tmp_path / "gone.png"], "no such file"),
        ("placeholders", ["--image", picture, "--image", picture], "for 2 --image file(s)"),
        ("context", many, "more than the model's context of 4096"),
        ("soft tokens", ["--image", picture, "--max-soft-tokens", 100], "takes one of 70, 140"),
        ("no graph", ["--image", picture, "--max-soft-tokens", 140], "no vision graph for 140 soft tokens"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_bad_input_is_refused_in_one_line(case, tiny_vision_export, tiny_export, picture, tmp_path, capsys):
    name, extra, fragment = _bad_inputs(tmp_path, picture)[case]
    artifacts = tiny_export if name == "text-only" else tiny_vision_export
    prompt = "5,511,7" if name != "context" else ",".join(["511"] * 63)
    code, out, err = run_cli(capsys, "generate", artifacts, "--prompt-ids", prompt, *[str(a) for a in extra],
                             *([] if name in ("soft tokens", "no graph") else ["--max-soft-tokens", "70"]))  # fmt: skip
    lines = [line for line in err.splitlines() if line.startswith("dllm-trt")]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err and not out
