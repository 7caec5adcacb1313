"""Graph weights that stay in the checkpoint until they are written: recipes and lazy initializers.

A traced graph's initializers are fake (see `skeleton.py`). Each is given a recipe: which
checkpoint tensor, cast to which dtype, transposed how. Small ones are read at once (the
optimizer may fold them with other constants or deduplicate them by content, exactly as it does
on a loaded model); large ones become `CheckpointWeight`s, lazy tensors that read their rows only
when the writer asks, one chunk at a time.

The exporter's optimizer folds `Transpose(weight)` into a new, pre-transposed initializer (it
always folds a Transpose whose large input has no other consumer). Left to the optimizer, that
fold would read every transposed weight into memory and keep it there, so `fold_lazy_transposes`
makes the same fold first, lazily, into the initializer the optimizer would have made (same name,
same bytes); only the order of the initializers differs (these come before the optimizer's own).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor

from dllm_trt.contract import FOLDED, TRANSPOSED, derived_name, unique_name
from dllm_trt.errors import DllmError
from dllm_trt.models.checkpoint import TensorEntry, read_rows
from dllm_trt.models.skeleton import CheckpointSources, is_fake

try:  # the optimizer's own limit (constants up to this many elements may be folded with anything) and metadata key
    from onnxscript.optimizer._constant_folding import DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT as FOLD_INPUT_LIMIT
    from onnxscript.optimizer._constant_folding import FOLDED_FROM_KEY
except ImportError:  # pragma: no cover (private names; their values in onnxscript 0.5-0.7)
    FOLD_INPUT_LIMIT = 8192
    FOLDED_FROM_KEY = "pkg.onnxscript.optimizer.folded_from"

# Output rows are produced in pieces of about this size: bounds the memory of one weight's cast and transpose.
CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class WeightRecipe:
    """One graph initializer as a function of one checkpoint tensor: cast, then permute axes."""

    source: TensorEntry
    dtype: torch.dtype
    perm: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.source.shape
        return tuple(shape[axis] for axis in self.perm) if self.perm else shape

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.dtype.itemsize

    def transposed(self, perm: tuple[int, ...]) -> WeightRecipe:
        current = self.perm or tuple(range(len(self.source.shape)))
        return WeightRecipe(self.source, self.dtype, tuple(current[axis] for axis in perm))

    def describe(self) -> str:
        perm = f" perm {list(self.perm)}" if self.perm else ""
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.source.name} {list(self.source.shape)} -> {dtype}{perm}"

    def materialize(self) -> torch.Tensor:
        return next(self.chunks(max_bytes=1 << 62))  # one piece: the whole tensor

    def chunks(self, max_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
        """Contiguous pieces along axis 0 of the result; their bytes, in order, are the tensor's bytes."""
        if not self.shape:
            yield read_rows(self.source).to(self.dtype)
            return
        rows = self.shape[0]
        step = max(1, max_bytes // max(1, self.nbytes // max(1, rows)))
        if self.perm is None or self.perm[0] == 0:
            # Axis 0 stays axis 0: each piece needs only its own rows of the checkpoint tensor.
            for first in range(0, rows, step):
                piece = read_rows(self.source, first, min(rows, first + step)).to(self.dtype)
                yield piece.permute(self.perm).contiguous() if self.perm else piece
            return
        # Axis 0 comes from another axis (a 2-D linear weight): read the source once, cut the result.
        source = read_rows(self.source).permute(self.perm)
        for first in range(0, rows, step):
            yield source[first : first + step].to(self.dtype).contiguous()


class CheckpointWeight(ir.LazyTensor):
    """An initializer whose bytes are read from the checkpoint when asked for, never cached."""

    def __init__(self, recipe: WeightRecipe, dtype: ir.DataType, name: str) -> None:
        super().__init__(
            lambda: TorchTensor(recipe.materialize(), name=name), dtype=dtype, shape=ir.Shape(recipe.shape), name=name
        )
        self.recipe = recipe


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes ONNX stores for `tensor` (bf16 included), without a copy."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def attach_weights(
    graph: ir.Graph,
    module: torch.nn.Module,
    model,  # noqa: ANN001 (the skeleton the module belongs to)
    index: dict[str, TensorEntry],
    eager_max_elements: int = FOLD_INPUT_LIMIT,
) -> None:
    """Give every fake initializer of a traced `module` its checkpoint bytes: now if small, lazily if large.

    `eager_max_elements` below the optimizer's folding limit stays correct (the optimizer then reads
    lazy weights when it folds them) but reads those weights during optimization; tests lower it.
    """
    named = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    sources = CheckpointSources(model, index)
    missing = []
    for name, value in graph.initializers.items():
        tensor = getattr(value.const_value, "raw", None)
        if not isinstance(tensor, torch.Tensor) or not is_fake(tensor):
            continue  # a real buffer derived from the config (RoPE frequencies, embedding scale)
        if name not in named:
            raise RuntimeError(f"traced initializer {name} is fake but no parameter or buffer of the module")
        entry = sources.entry(named[name])
        if entry is None:
            missing.append(sources.name(named[name]) or name)
            continue
        if entry.shape != tuple(tensor.shape):
            raise DllmError(
                f"checkpoint tensor {entry.name} has shape {list(entry.shape)}, its config.json implies "
                f"{list(tensor.shape)}; the weights do not belong to this config"
            )
        recipe = WeightRecipe(entry, tensor.dtype)
        if tensor.numel() <= eager_max_elements:
            value.const_value = TorchTensor(recipe.materialize(), name=name)
        else:
            value.const_value = CheckpointWeight(recipe, value.const_value.dtype, name)
    if missing:
        shown = ", ".join(sorted(missing)[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DllmError(f"the checkpoint lacks {len(missing)} tensor(s) the model needs: {shown}")


def fold_lazy_transposes(graph: ir.Graph, large: int = FOLD_INPUT_LIMIT) -> int:
    """Replace `Transpose(lazy weight)` by a lazy transposed initializer wherever the optimizer would fold it.

    Mirrors onnxscript's rule and result: a Transpose of a constant is folded when the constant is
    small, or when it is large and the Transpose is its only consumer (a large weight read
    elsewhere too, like the tied embedding, keeps a runtime Transpose); the folded initializer
    takes the Transpose output's name, and a source left unused is dropped. The optimizer then
    finds nothing left to fold there. Returns the number folded.
    """
    folded = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.inputs[0]
        weight = source.const_value if source is not None and source.is_initializer() else None
        if not isinstance(weight, CheckpointWeight):
            continue
        if weight.size > large and len(source.uses()) != 1:
            continue
        rank = len(weight.recipe.shape)
        perm_attr = node.attributes.get("perm")
        perm = tuple(perm_attr.as_ints()) if perm_attr is not None else tuple(reversed(range(rank)))
        output = node.outputs[0]
        name = output.name
        lazy = CheckpointWeight(weight.recipe.transposed(perm), weight.dtype, name)
        folded_value = ir.Value(name=None, shape=ir.Shape(lazy.shape), type=ir.TensorType(lazy.dtype), const_value=lazy)
        output.replace_all_uses_with(folded_value)
        graph.remove(node, safe=True)
        folded_value.name = name
        # What the optimizer records on a value it folded (it ends up in the graph's value_info).
        folded_value.meta[FOLDED_FROM_KEY] = {source.name}
        folded_value.metadata_props[FOLDED_FROM_KEY] = repr(sorted({source.name}))
        graph.register_initializer(folded_value)
        if not source.uses() and not source.is_graph_output():
            graph.initializers.pop(source.name)
        folded += 1
    return folded


def name_after_checkpoint(graph: ir.Graph, module: torch.nn.Module, model, index: dict[str, TensorEntry]) -> int:  # noqa: ANN001
    """Every initializer holding a checkpoint tensor takes that tensor's name (`model.decoder.layers.0.
    mlp.gate_proj.weight`), with `.T` where the graph holds it transposed, so that refit by name,
    polygraphy and per-layer tools find it. The exporter's own names (`val_105`, `transpose_5`)
    say nothing; derived buffers (RoPE frequencies) and computed constants keep theirs. Returns the count.
    """
    named = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    sources = CheckpointSources(model, index)
    renamed = 0
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        permuted = None  # whether the graph holds the tensor with its axes permuted; None: tell by shape
        if isinstance(tensor, CheckpointWeight):
            source, shape = tensor.recipe.source, tensor.recipe.shape
            permuted = tensor.recipe.perm not in (None, tuple(range(len(source.shape))))
        else:
            origin = value.name
            folded = value.meta.get(FOLDED_FROM_KEY)
            if origin not in named and folded and len(folded) == 1:
                origin = next(iter(folded))
            source = sources.entry(named[origin]) if origin in named else None
            if source is None:
                continue
            shape = tuple(value.shape.dims) if value.shape is not None else ()
            if origin != value.name and shape == tuple(source.shape) and len(set(shape)) < len(shape):
                # a small weight the optimizer folded, with equal axes (a square matrix; gate_up [E, 2I, H]
                # with 2I = H): the shape cannot tell a transpose, the values can
                held = np.asarray(tensor.numpy()).astype(np.float32)
                original = WeightRecipe(source, named[origin].dtype).materialize().float().numpy()
                permuted = not np.array_equal(held, original)
        if shape == tuple(source.shape) and not permuted:
            name = source.name
        elif sorted(shape) == sorted(source.shape):
            name = derived_name(source.name, TRANSPOSED)
        else:
            name = derived_name(source.name, FOLDED)
        if name == value.name:
            continue
        value.name = unique_name(graph.initializers, name)
        renamed += 1
    return renamed
