"""Open a DiffusionGemma checkpoint directory, refusing bad input with a message that says what to do.

A checkpoint is the Hugging Face layout: `config.json`, optional `generation_config.json`, and
either `model.safetensors` or shards listed in `model.safetensors.index.json`. Weights are read
from safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dllm_trt.errors import DllmError

SUPPORTED_MODEL_TYPES = ("diffusion_gemma",)


def read_config(ckpt: Path) -> dict:
    if not ckpt.exists():
        raise DllmError(f"checkpoint directory {ckpt} does not exist; pass a directory holding config.json")
    if not ckpt.is_dir():
        raise DllmError(f"{ckpt} is not a directory; pass the checkpoint directory, not a file in it")
    config_path = ckpt / "config.json"
    if not config_path.is_file():
        raise DllmError(f"{ckpt} has no config.json; is this a Hugging Face checkpoint directory?")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DllmError(f"{config_path} is not valid JSON ({exc}); re-download or re-save the checkpoint") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise DllmError(
            f"{ckpt} holds a '{model_type}' model, not DiffusionGemma (model_type 'diffusion_gemma'); "
            "dllm-trt exports DiffusionGemma checkpoints only"
        )
    return config


def safetensors_files(ckpt: Path) -> list[Path]:
    """The weight files of the checkpoint, each checked to be a complete safetensors file."""
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DllmError(
                f"{index} is not a valid safetensors index (no weight_map); re-save the checkpoint"
            ) from None
        files = [ckpt / name for name in sorted(set(weight_map.values()))]
    elif (ckpt / "model.safetensors").is_file():
        files = [ckpt / "model.safetensors"]
    else:
        found = sorted(p.name for p in ckpt.glob("*.bin")) + sorted(p.name for p in ckpt.glob("*.pt"))
        hint = f" (found {', '.join(found)}: pickle files are not loaded; convert them to safetensors)" if found else ""
        raise DllmError(f"{ckpt} has no model.safetensors or model.safetensors.index.json{hint}")
    for path in files:
        check_safetensors_file(path)
    return files


def check_safetensors_file(path: Path) -> dict:
    """Parse the header and check the file holds every byte the header promises (catches truncation)."""
    if not path.is_file():
        raise DllmError(f"weight file {path} is missing; the checkpoint is incomplete")
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length past end of file")
            header = json.loads(handle.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError):
        raise DllmError(
            f"{path} is not a valid safetensors file (corrupt or truncated header); re-download it"
        ) from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise DllmError(
            f"{path} is truncated: its header promises {8 + header_len + end} bytes but the file has {size}; "
            "re-download it"
        )
    return header


# safetensors dtype names -> torch dtypes (the ones a DiffusionGemma checkpoint can hold).
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one checkpoint tensor's bytes lie: file, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def tensor_index(files: list[Path]) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint by name, from the safetensors headers alone (no data is read)."""
    index: dict[str, TensorEntry] = {}
    for path in files:
        header = check_safetensors_file(path)
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info.get("dtype") not in SAFETENSORS_DTYPES:
                raise DllmError(f"{path.name}: tensor {name} has dtype {info.get('dtype')}, which dllm-trt cannot read")
            begin, end = info["data_offsets"]
            index[name] = TensorEntry(
                name, path, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + header_len + begin,
                8 + header_len + end,
            )  # fmt: skip
    return index


def read_rows(entry: TensorEntry, first: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [first, stop) along axis 0 of one checkpoint tensor, read with plain file reads.

    No memory map: pages of a mapped 50 GB checkpoint would count against the process as they
    are touched, and the point of streaming is that only the rows asked for are resident.
    """
    rows = entry.shape[0] if entry.shape else 1
    stop = rows if stop is None else stop
    row_bytes = entry.nbytes // rows if rows else 0
    shape = (stop - first, *entry.shape[1:]) if entry.shape else ()
    out = torch.empty(shape, dtype=entry.dtype)
    view = memoryview(out.view(torch.uint8).numpy() if out.dim() else out.reshape(1).view(torch.uint8).numpy())
    with entry.file.open("rb", buffering=0) as handle:
        handle.seek(entry.start + first * row_bytes)
        done = 0
        while done < len(view):
            count = handle.readinto(view[done:])
            if not count:
                raise DllmError(f"{entry.file} ended inside tensor {entry.name}; re-download the checkpoint")
            done += count
    return out


def checkpoint_hash(ckpt: Path, files: list[Path], advance: Callable[[int], None] | None = None) -> str:
    """sha256 over config.json and every weight file, in a fixed order: what the manifest pins.

    Streamed in 16 MB reads (memory does not grow with the checkpoint); `advance(n)` is told of every read.
    """
    digest = hashlib.sha256()
    for path in [ckpt / "config.json", *files]:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
                if advance is not None:
                    advance(len(chunk))
    return "sha256:" + digest.hexdigest()


def load_model(ckpt: Path, dtype: torch.dtype | None = None):  # noqa: ANN201 (transformers type)
    """Load `DiffusionGemmaForBlockDiffusion` from safetensors, failing on any missing tensor."""
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    read_config(ckpt)
    safetensors_files(ckpt)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = DiffusionGemmaForBlockDiffusion.from_pretrained(
            ckpt, use_safetensors=True, output_loading_info=True, dtype=dtype if dtype is not None else "auto"
        )
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DllmError(f"transformers could not load {ckpt}: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [k for k in info.get("missing_keys", []) if "vision" not in k]
    if missing:
        shown = ", ".join(sorted(missing)[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DllmError(f"{ckpt} lacks {len(missing)} tensor(s) the model needs: {shown}")
    mismatched = info.get("mismatched_keys", [])
    if mismatched:
        raise DllmError(f"{ckpt} has tensors of the wrong shape for its config.json: {mismatched[0]}")
    return model.eval()
