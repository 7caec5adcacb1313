"""What every optimize pass is told: the target, the precision, which graph, and the model's facts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PassContext:
    target: str  # one of contract.TARGETS
    precision: str  # one of contract.PRECISIONS
    graph: str  # a key of contract.GRAPH_FILES ("step")
    model: dict  # manifest["model"]: num_experts, top_k_experts, hidden_size, layers, vocab_size, ...

    @property
    def num_experts(self) -> int:
        return self.model["num_experts"]

    @property
    def top_k(self) -> int:
        return self.model["top_k_experts"]
