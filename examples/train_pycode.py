"""Train a tiny DiffusionGemma (``DiffusionGemmaForBlockDiffusion``) on Python standard-library source.

The result is the small embedded default checkpoint of ``dllm_trt`` (``src/dllm_trt/assets/pycode-tiny``): the real
DiffusionGemma architecture (sliding + full attention with K=V full layers, GQA, dense MLP + top-k MoE with
per-expert scales, final logit softcap, self-conditioning) at a size that trains on two CPU cores in about an hour.

Training objective (what ``DiffusionGemmaForBlockDiffusion.generate`` implies):

* an example is a context (prefix, variable length) plus the next ``canvas_length`` clean tokens;
* the encoder runs causally over the context and fills the KV cache, the decoder denoises the canvas while reading it;
* the canvas is corrupted with *uniform* noise: every position is replaced by a uniformly random vocabulary id with
  probability ``t ~ U(0, 1)`` (per example), because the sampler re-randomises rejected positions the same way;
* self-conditioning: for a random half of the examples a first no-grad decoder pass produces logits that condition
  the second, graded pass (``self_conditioning_logits`` + per-example ``self_conditioning_mask``);
* loss = cross-entropy of the canvas logits against the clean canvas, all positions.

Importing this module has no side effects; the helpers are reused by ``tests/test_trained_checkpoint.py``.

Example::

    python examples/train_pycode.py --out /tmp/pycode-tiny --max-minutes 70
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
# Order matters: the BPE trainer assigns ids to special tokens in this order, and they must match the model config.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
# Statement starts that make good prompts ("def fibonacci(n):"), oversampled as context starts.
DEF_PREFIXES = ("def ", "class ", "async def ", "@")

# Example kinds: file start (context begins with <bos> + first tokens of a file), top-level def/class start,
# or an arbitrary token position.
KIND_FILE_START, KIND_DEF_START, KIND_RANDOM = 0, 1, 2


# --------------------------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_stdlib_files(root: Path | None = None) -> list[str]:
    """Relative POSIX paths of the standard library's ``.py`` files, sorted (so every later step is reproducible)."""
    root = root or stdlib_root()
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("."))
        for name in filenames:
            if name.endswith(".py"):
                out.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(out)


def is_heldout(rel_path: str, fraction: float = 0.02) -> bool:
    """Deterministic split by path hash: independent of file contents, Python patch version and file order."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_files(files: Sequence[str], fraction: float = 0.02) -> tuple[list[str], list[str]]:
    train = [f for f in files if not is_heldout(f, fraction)]
    heldout = [f for f in files if is_heldout(f, fraction)]
    return train, heldout


def read_sources(rel_paths: Iterable[str], root: Path | None = None) -> list[str]:
    root = root or stdlib_root()
    texts = []
    for rel in rel_paths:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a handful of stdlib files are deliberately not UTF-8
        if text.strip():
            texts.append(text)
    return texts


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------
def train_tokenizer(texts: Sequence[str], vocab_size: int = 4096) -> Any:
    """Byte-level BPE: every byte sequence round-trips, so any Python source (or prompt) is encodable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"special token {name} got id {tok.token_to_id(name)}, expected {i}"
    return tok


def save_tokenizer(tok: Any, out_dir: Path) -> None:
    """Writes tokenizer.json plus the config files ``AutoTokenizer.from_pretrained`` needs."""
    from transformers import PreTrainedTokenizerFast

    # No BOS/EOS post-processor: prompts are encoded verbatim (that is what the training contexts that start at a
    # ``def`` look like); callers that want a file-start prompt prepend <bos> themselves.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))


def encode_documents(tok: Any, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids (with a trailing <eos>) and the token positions where a top-level def/class/decorator starts."""
    docs = []
    for enc, text in zip(tok.encode_batch(list(texts)), texts, strict=True):
        ids = np.asarray([*enc.ids, EOS_ID], dtype=np.int64)
        def_starts = []
        for i, (start, _end) in enumerate(enc.offsets):
            # Byte-level BPE keeps "\n" + indentation in one token, so a token that begins right after a newline
            # with a non-blank char is exactly a top-level statement start.
            if (start == 0 or text[start - 1] == "\n") and text.startswith(DEF_PREFIXES, start):
                def_starts.append(i)
        docs.append((ids, np.asarray(def_starts, dtype=np.int64)))
    return docs


# --------------------------------------------------------------------------------------------------------------------
# Model / generation config
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSize:
    vocab_size: int = 4096
    hidden_size: int = 192
    num_hidden_layers: int = 6
    intermediate_size: int = 256
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 48
    global_head_dim: int = 96
    num_global_key_value_heads: int = 1
    num_experts: int = 8
    top_k_experts: int = 2
    moe_intermediate_size: int = 64
    sliding_window: int = 64
    canvas_length: int = 32
    max_position_embeddings: int = 4096


def layer_types_for(num_layers: int) -> list[str]:
    """Gemma-style local/global interleave, scaled down: every third layer is full and the last one always is."""
    types = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(num_layers)]
    types[-1] = "full_attention"
    return types


def build_config(size: ModelSize, experts_implementation: str | None = None) -> Any:
    from transformers import DiffusionGemmaConfig

    text_config = {
        "vocab_size": size.vocab_size,
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_hidden_layers,
        "num_attention_heads": size.num_attention_heads,
        "num_key_value_heads": size.num_key_value_heads,
        "head_dim": size.head_dim,
        "global_head_dim": size.global_head_dim,
        "num_global_key_value_heads": size.num_global_key_value_heads,
        "layer_types": layer_types_for(size.num_hidden_layers),
        "sliding_window": size.sliding_window,
        "max_position_embeddings": size.max_position_embeddings,
        "num_experts": size.num_experts,
        "top_k_experts": size.top_k_experts,
        "moe_intermediate_size": size.moe_intermediate_size,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "bos_token_id": BOS_ID,
    }
    config = DiffusionGemmaConfig(
        text_config=text_config,
        # Text only: the vision tower must exist for the architecture but is never run, so keep it negligible.
        vision_config={
            "model_type": "gemma4_vision",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 8,
        },
        canvas_length=size.canvas_length,
        # The image-token ids of the big model lie outside this vocabulary; park them on <unk> (never produced
        # by the byte-level tokenizer), so generate()'s "image token in prompt" check can never fire spuriously.
        boi_token_id=UNK_ID,
        eoi_token_id=UNK_ID,
        image_token_id=UNK_ID,
    )
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
        config.text_config._experts_implementation = experts_implementation
    return config


# Tuned on the trained pycode-tiny checkpoint (sweep over steps 16-48 x entropy bound 0.1-2.0). This small model's
# per-token entropies stay high, and adaptive stopping needs a *stable* argmax canvas, i.e. nearly every position
# accepted (rejected ones are re-randomised). With the library default (48 steps, bound 0.1) only ~1 token is accepted
# per step, so it runs ~46 of 48 steps. Bound 1.0 accepts a few tokens per step, finishes the canvas and stops after
# ~21 of 24 steps, with the same bigram-likelihood "Python-likeness" of the output at about half the decoder passes.
# Temperatures and stopping thresholds keep the library defaults except confidence 0.05 (0.005 is rarely reached).
DEFAULT_GENERATION = {
    "max_new_tokens": 64,
    "max_denoising_steps": 24,
    "entropy_bound": 1.0,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.05,
}


def build_generation_config(**overrides: Any) -> Any:
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    values = {**DEFAULT_GENERATION, **overrides}
    return DiffusionGemmaGenerationConfig(
        max_new_tokens=int(values["max_new_tokens"]),
        max_denoising_steps=int(values["max_denoising_steps"]),
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=float(values["entropy_bound"])),
        t_min=float(values["t_min"]),
        t_max=float(values["t_max"]),
        stability_threshold=int(values["stability_threshold"]),
        confidence_threshold=float(values["confidence_threshold"]),
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
    )


# --------------------------------------------------------------------------------------------------------------------
# Examples and objective
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingSpec:
    canvas_length: int = 32
    max_context: int = 192
    sliding_window: int = 64
    p_file_start: float = 0.2
    p_def_start: float = 0.4
    p_bos_at_def: float = 0.5


class ExampleSampler:
    """Draws (context, clean canvas) pairs; one context length per batch so no padding/masking is needed."""

    def __init__(self, docs: Sequence[tuple[np.ndarray, np.ndarray]], spec: SamplingSpec, seed: int) -> None:
        self.spec = spec
        self.rng = np.random.default_rng(seed)
        self.docs = [d for d in docs if len(d[0]) >= 2]
        lengths = np.asarray([len(d[0]) for d in self.docs], dtype=np.float64)
        self.doc_weights = lengths / lengths.sum()  # uniform over token positions
        self.def_index = [(di, int(p)) for di, (_, starts) in enumerate(self.docs) for p in starts]

    def sample_context_length(self) -> int:
        spec = self.spec
        # Half the batches stay inside the sliding window, half exceed it (so sliding layers see a truncated cache).
        if self.rng.random() < 0.5:
            return int(self.rng.integers(1, spec.sliding_window + 1))
        return int(self.rng.integers(spec.sliding_window + 1, spec.max_context + 1))

    def _slice(self, ids: np.ndarray, start: int, length: int, bos: bool) -> tuple[np.ndarray, np.ndarray]:
        c = self.spec.canvas_length
        body = length - 1 if bos else length
        ctx = ids[start : start + body]
        if bos:
            ctx = np.concatenate([[BOS_ID], ctx])
        canvas = ids[start + body : start + body + c]
        # Past the end of a file the canvas is <pad>: generate() also pads everything after <eos>.
        canvas = np.pad(canvas, (0, c - len(canvas)), constant_values=PAD_ID)
        return ctx, canvas

    def sample_one(self, length: int, kind: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        spec = self.spec
        if kind is None:
            r = self.rng.random()
            kind = (
                KIND_FILE_START
                if r < spec.p_file_start
                else KIND_DEF_START
                if r < spec.p_file_start + spec.p_def_start
                else KIND_RANDOM
            )
        for _ in range(100):
            if kind == KIND_FILE_START:
                ids = self.docs[int(self.rng.integers(len(self.docs)))][0]
                if len(ids) >= length:  # context must fit, canvas may run into padding
                    return self._slice(ids, 0, length, bos=True)
            elif kind == KIND_DEF_START and self.def_index:
                di, start = self.def_index[int(self.rng.integers(len(self.def_index)))]
                ids = self.docs[di][0]
                bos = bool(self.rng.random() < spec.p_bos_at_def)
                if start + length - int(bos) < len(ids):
                    return self._slice(ids, start, length, bos=bos)
            else:
                ids = self.docs[int(self.rng.choice(len(self.docs), p=self.doc_weights))][0]
                if len(ids) > length:
                    start = int(self.rng.integers(0, len(ids) - length))
                    return self._slice(ids, start, length, bos=False)
            kind = KIND_RANDOM  # e.g. every def too close to its file end for this length: fall back
        raise RuntimeError(f"could not sample an example with context length {length}")

    def sample_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.sample_context_length()
        pairs = [self.sample_one(length) for _ in range(batch_size)]
        ctx = torch.from_numpy(np.stack([p[0] for p in pairs]))
        canvas = torch.from_numpy(np.stack([p[1] for p in pairs]))
        return ctx, canvas


def corrupt_canvas(
    clean: torch.Tensor, vocab_size: int, generator: torch.Generator, t: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform-noise corruption: position -> uniform random id with probability t (t ~ U(0,1) per example)."""
    batch = clean.shape[0]
    if t is None:
        t = torch.rand(batch, generator=generator)
    replace = torch.rand(clean.shape, generator=generator) < t[:, None]
    noise = torch.randint(0, vocab_size, clean.shape, generator=generator)
    return torch.where(replace, noise, clean), t


def denoising_loss(
    model: Any,
    ctx: torch.Tensor,
    clean: torch.Tensor,
    generator: torch.Generator,
    sc_prob: float = 0.5,
    t: torch.Tensor | None = None,
    sc_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-diffusion loss for a batch sharing one context length.

    The encoder fills the KV cache with gradients attached (the cache only holds references to the graph's K/V
    tensors), then the decoder runs once without and once with self-conditioning on the same noisy canvas.
    """
    vocab_size = model.config.text_config.vocab_size
    noisy, _ = corrupt_canvas(clean, vocab_size, generator, t)
    if sc_mask is None:
        sc_mask = torch.rand(clean.shape[0], generator=generator) < sc_prob
    cache = model.model.encoder(input_ids=ctx, use_cache=True).cache
    sc_logits = None
    if bool(sc_mask.any()):
        with torch.no_grad():
            sc_logits = model(cache=cache, decoder_input_ids=noisy).logits.detach()
    logits = model(
        cache=cache,
        decoder_input_ids=noisy,
        self_conditioning_logits=sc_logits,
        self_conditioning_mask=sc_mask if sc_logits is not None else None,
    ).logits
    return F.cross_entropy(logits.reshape(-1, vocab_size), clean.reshape(-1))


def fixed_eval_batches(
    docs: Sequence[tuple[np.ndarray, np.ndarray]],
    spec: SamplingSpec,
    num_batches: int = 8,
    batch_size: int = 8,
    seed: int = 1234,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A reproducible held-out set: context lengths spread over [1, max_context], noise levels spread over (0, 1)."""
    sampler = ExampleSampler(docs, spec, seed)
    lengths = np.linspace(1, spec.max_context, num_batches).round().astype(int)
    batches = []
    for b, length in enumerate(lengths):
        pairs = [sampler.sample_one(int(length)) for _ in range(batch_size)]
        ctx = torch.from_numpy(np.stack([p[0] for p in pairs]))
        canvas = torch.from_numpy(np.stack([p[1] for p in pairs]))
        t = (torch.arange(batch_size, dtype=torch.float32) + 0.5 + b / num_batches) / (batch_size + 1)
        batches.append((ctx, canvas, t.clamp(0.02, 0.98)))
    return batches


@torch.no_grad()
def evaluate(model: Any, batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], seed: int = 0) -> float:
    """Mean held-out denoising loss, no self-conditioning (the first denoising step's situation); deterministic."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for ctx, canvas, t in batches:
        no_sc = torch.zeros(ctx.shape[0], dtype=torch.bool)
        loss = denoising_loss(model, ctx, canvas, gen, t=t, sc_mask=no_sc)
        total += float(loss) * canvas.numel()
        count += canvas.numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def sample_text(model: Any, tok: Any, prompt: str, seed: int = 0, max_new_tokens: int | None = None, **gen: Any) -> str:
    """Decoded continuation of ``prompt`` (prompt included) from the reference ``generate()``."""
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    ids = torch.tensor([tok.encode(prompt).ids])
    if max_new_tokens is not None:
        gen["max_new_tokens"] = max_new_tokens
    out = model.generate(ids, generation_config=build_generation_config(**{**DEFAULT_GENERATION, **gen}))
    model.train(was_training)
    return tok.decode(out.sequences[0].tolist(), skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------
class ThreadTuner:
    """Picks 1 or N intra-op threads by measured throughput, re-checked periodically.

    On a shared 2-core machine a second OpenMP thread stalls every parallel op whenever the other core is busy, so
    under contention one thread can beat two; without contention two win. Costs are seconds per unit of work
    (batch x (context + 2 x canvas) tokens) because context lengths differ from batch to batch.
    """

    def __init__(self, max_threads: int, period: int = 150, probe: int = 8) -> None:
        self.options = sorted({1, max_threads})
        self.current = max_threads
        self.period, self.probe = period, probe
        self.costs: dict[int, list[float]] = {n: [] for n in self.options}

    def threads_for(self, step: int) -> int:
        if len(self.options) == 1:
            return self.current
        pos = step % (self.period + self.probe)
        if pos == self.probe and self.costs[self._other()]:
            # Probe of the other option just finished: keep whichever is currently cheaper.
            med = {n: float(np.median(c[-self.probe :])) for n, c in self.costs.items() if c}
            self.current = min(med, key=med.__getitem__)
        return self._other() if pos < self.probe else self.current

    def _other(self) -> int:
        return next(n for n in self.options if n != self.current)

    def record(self, threads: int, seconds: float, work: float) -> None:
        self.costs[threads] = [*self.costs[threads][-(self.probe - 1) :], seconds / work]


def lr_at(progress: float, peak: float, warmup_fraction: float, final_fraction: float = 0.1) -> float:
    if progress < warmup_fraction:
        return peak * progress / warmup_fraction
    p = min(1.0, (progress - warmup_fraction) / max(1e-9, 1.0 - warmup_fraction))
    return peak * (final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * p)))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="final checkpoint directory (written atomically at the end)")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch dir for periodic checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20000, help="step budget (also the LR schedule length)")
    p.add_argument("--max-minutes", type=float, default=70.0, help="wall-time budget for the training loop")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=float, default=0.03, help="warm-up as a fraction of the budget")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads; 0 = adaptive between 1 and all cores (faster on a shared machine, not bitwise "
        "reproducible); fix it for bit-exact reruns",
    )
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--intermediate-size", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--moe-intermediate-size", type=int, default=64)
    p.add_argument("--sliding-window", type=int, default=64)
    p.add_argument("--canvas-length", type=int, default=32)
    p.add_argument("--max-context", type=int, default=192)
    p.add_argument("--heldout-fraction", type=float, default=0.02)
    p.add_argument("--experts-implementation", default="grouped_mm", help="training-time only, not saved")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every-minutes", type=float, default=10.0)
    p.add_argument("--eval-batches", type=int, default=16)
    for key, value in DEFAULT_GENERATION.items():
        p.add_argument(f"--gen-{key.replace('_', '-')}", type=type(value), default=value, dest=f"gen_{key}")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    max_threads = args.threads or max(1, os.cpu_count() or 1)
    tuner = ThreadTuner(max_threads) if args.threads == 0 else None
    torch.set_num_threads(max_threads)
    torch.set_num_interop_threads(1)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:8.1f}s] {msg}", flush=True)

    files = list_stdlib_files()
    train_files, heldout_files = split_files(files, args.heldout_fraction)
    train_texts, heldout_texts = read_sources(train_files), read_sources(heldout_files)
    log(f"stdlib {stdlib_root()}: {len(files)} files, train {len(train_texts)}, held-out {len(heldout_texts)}")

    tok = train_tokenizer(train_texts, args.vocab_size)
    train_docs, heldout_docs = encode_documents(tok, train_texts), encode_documents(tok, heldout_texts)
    n_train_tokens = sum(len(d[0]) for d in train_docs)
    log(
        f"tokenizer vocab {tok.get_vocab_size()}; train tokens {n_train_tokens}, held-out tokens "
        f"{sum(len(d[0]) for d in heldout_docs)}"
    )

    size = ModelSize(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        intermediate_size=args.intermediate_size,
        num_experts=args.experts,
        top_k_experts=args.top_k,
        moe_intermediate_size=args.moe_intermediate_size,
        sliding_window=args.sliding_window,
        canvas_length=args.canvas_length,
    )
    spec = SamplingSpec(
        canvas_length=args.canvas_length, max_context=args.max_context, sliding_window=args.sliding_window
    )
    config = build_config(size, args.experts_implementation)
    model = DiffusionGemmaForBlockDiffusion(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model params {n_params} ({n_params * 4 / 1e6:.2f} MB fp32), layer types {config.text_config.layer_types}")

    eval_batches = fixed_eval_batches(heldout_docs, spec, num_batches=args.eval_batches, batch_size=8)
    probe_batches = eval_batches[:: max(1, len(eval_batches) // 4)]
    random_init_heldout = evaluate(model, eval_batches)
    log(f"held-out loss at random init: {random_init_heldout:.4f}")

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Norm gains, router scales and per-expert scales are multiplicative gains: decaying them towards 0 is wrong.
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    sampler = ExampleSampler(train_docs, spec, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="pycode-train-"))
    work_dir.mkdir(parents=True, exist_ok=True)

    budget_s = args.max_minutes * 60.0
    t_train = time.time()
    last_eval = t_train
    step, running, history = 0, None, []
    stop_reason = "steps"
    while step < args.steps:
        elapsed = time.time() - t_train
        if elapsed >= budget_s:
            stop_reason = "max-minutes"
            break
        # Whichever budget is tighter drives the schedule, so a time-bound run still anneals fully.
        progress = max(step / args.steps, elapsed / budget_s)
        lr = lr_at(progress, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        threads = tuner.threads_for(step) if tuner is not None else max_threads
        torch.set_num_threads(threads)
        t_step = time.perf_counter()
        ctx, canvas = sampler.sample_batch(args.batch_size)
        loss = denoising_loss(model, ctx, canvas, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        if tuner is not None:
            tuner.record(threads, time.perf_counter() - t_step, ctx.shape[0] * (ctx.shape[1] + 2 * canvas.shape[1]))
        step += 1
        value = loss.detach().item()
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % args.log_every == 0 or step == 1:
            el = time.time() - t_train
            log(
                f"step {step:6d} loss {value:.4f} ema {running:.4f} lr {lr:.2e} gnorm {grad_norm:.2f} "
                f"ctx {ctx.shape[1]:3d} thr {threads} elapsed {el / 60:6.2f} min ({el / step:.3f} s/step)"
            )
            history.append({"step": step, "loss": value, "ema": running, "lr": lr, "elapsed_s": round(el, 1)})
        if time.time() - last_eval >= args.eval_every_minutes * 60.0:
            probe = evaluate(model, probe_batches)
            sample = sample_text(model, tok, "def fibonacci(n):")
            log(f"step {step:6d} held-out probe loss {probe:.4f}; sample: {sample!r}")
            history.append({"step": step, "heldout_probe": probe, "elapsed_s": round(time.time() - t_train, 1)})
            model.save_pretrained(str(work_dir / "last"))
            last_eval = time.time()
    train_wall = time.time() - t_train
    log(f"training stopped by {stop_reason} after {step} steps, {train_wall / 60:.2f} min")

    heldout = evaluate(model, eval_batches)
    log(f"held-out loss: trained {heldout:.4f} vs random init {random_init_heldout:.4f}")

    staging = Path(tempfile.mkdtemp(prefix="pycode-tiny-"))
    model.eval()
    # The experts kernel choice is a runtime detail: never persist the training-time override.
    model.config._experts_implementation = None
    model.config.text_config._experts_implementation = None
    gen_overrides = {k: getattr(args, f"gen_{k}") for k in DEFAULT_GENERATION}
    model.generation_config = build_generation_config(**gen_overrides)
    model.save_pretrained(str(staging), safe_serialization=True)
    save_tokenizer(tok, staging)
    train_log = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seed": args.seed,
        "steps": step,
        "step_budget": args.steps,
        "max_minutes": args.max_minutes,
        "stop_reason": stop_reason,
        "train_wall_time_s": round(train_wall, 1),
        "total_wall_time_s": round(time.time() - t_start, 1),
        "batch_size": args.batch_size,
        "threads": args.threads or "adaptive",
        "final_train_loss_ema": running,
        "heldout_loss": heldout,
        "heldout_loss_random_init": random_init_heldout,
        "num_parameters": n_params,
        "generation_config": gen_overrides,
        "train_tokens": n_train_tokens,
        "heldout_files": heldout_files,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "history": history,
    }
    (staging / "training_log.json").write_text(json.dumps(train_log, indent=1) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.move(str(staging), str(args.out))
    # mkdtemp creates owner-only files; the shipped assets must be readable by everyone.
    args.out.chmod(0o755)
    for f in args.out.iterdir():
        f.chmod(0o644)
    log(f"saved {args.out}: {sorted(p.name for p in args.out.iterdir())}")


if __name__ == "__main__":
    main()
