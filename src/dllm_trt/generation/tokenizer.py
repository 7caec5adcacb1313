"""What turns ids into text beside the graphs: the tokenizer and generation config an artifact carries,
and the incremental decoding a stream of canvases needs.

Kept in the leaf so that every verb that generates (generate, serve, the Triton model) reads them the
same way.
"""

from __future__ import annotations

import json
from pathlib import Path


def load_tokenizer(artifacts: Path):  # noqa: ANN201
    """The tokenizer carried beside the graphs, or None when the checkpoint had none."""
    if not (artifacts / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(artifacts))
    except (OSError, ValueError):
        return PreTrainedTokenizerFast(tokenizer_file=str(artifacts / "tokenizer.json"))


def generation_config(artifacts: Path) -> dict:
    path = artifacts / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


class TextStream:
    """The text of a growing list of ids, handed out as pieces whose concatenation is the whole text.

    A canvas can end inside a character (byte-level BPE splits UTF-8 sequences over tokens), so each
    piece is the decoded text of everything so far less what was already handed out, holding back a
    trailing replacement character until the ids that complete it arrive.
    """

    def __init__(self, tokenizer) -> None:  # noqa: ANN001
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, ids: list[int], final: bool = False) -> str:
        """Add ids; the text they complete (everything, when `final`)."""
        self.ids += ids
        text = self.text()
        if not final and text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        if not text.startswith(self.sent):  # a tokenizer that re-reads earlier bytes: send only what is new
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece
