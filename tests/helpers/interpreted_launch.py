"""A plugin's launch run by Triton's interpreter from the addresses its enqueue computes.

Each address becomes a view of the CPU tensor it points into (from that address to the tensor's end),
typed as the kernel's parameter declares, so a wrong offset, an overlap or inputs taken in the wrong
order shows up as a wrong result: what the plugins' launch functions do, checked without a GPU.
"""

from __future__ import annotations

import importlib

import torch

TORCH = {"*fp32": torch.float32, "*bf16": torch.bfloat16, "*fp16": torch.float16, "*i32": torch.int32,
         "*u8": torch.uint8, "*fp8e4nv": torch.float8_e4m3fn}  # fmt: skip


class InterpretedLaunch:
    """One kernel spec (kernels.*_launches.KernelSpec) launched on the owners' memory by the interpreter."""

    def __init__(self, spec, owners: list[torch.Tensor]) -> None:  # noqa: ANN001
        self.spec = spec
        self.owners = owners
        self.calls = 0

    def _view(self, address: int, kind: str) -> torch.Tensor:
        for owner in self.owners:
            raw = owner.view(-1).view(torch.uint8)
            if raw.data_ptr() <= address < raw.data_ptr() + raw.numel():
                return raw[address - raw.data_ptr() :].view(TORCH[kind])
        raise AssertionError(f"address {address:#x} is inside no tensor handed to the launch")

    def launch(self, grid: tuple[int, int, int], args: list[int], stream: int) -> None:
        assert len(args) == len(self.spec.signature)
        arguments = {param: value if kind == "i32" else self._view(value, kind)
                     for (param, kind), value in zip(self.spec.signature, args, strict=True)}  # fmt: skip
        kernel = getattr(importlib.import_module(self.spec.module), self.spec.kernel)
        kernel[grid](**arguments, **self.spec.constants(), num_warps=self.spec.num_warps)
        self.calls += 1
