"""Spec section ``moe``: upcycle dense MLPs into sparse Mixture-of-Experts layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config_base import SectionSpec, spec_field


@dataclass
class MoESpec(SectionSpec):
    section = "moe"

    num_experts: int = spec_field(8, help="Experts per upcycled layer.")
    top_k: int = spec_field(2, help="Experts each token is routed to.")
    layers: Literal["all"] | list[int] = spec_field("all", help="'all' or a list of layer indices to upcycle.")
    init: Literal["copy", "partition"] = spec_field(
        "copy", help="copy: every expert a copy of the MLP; partition: intermediate neurons split among experts."
    )
    noise: float = spec_field(0.0, help="Gaussian noise added to each expert weight, relative to its std.")
    router_aux_loss_coef: float = spec_field(0.01, help="Weight of the load-balancing loss added in training.")
    router_z_loss_coef: float = spec_field(0.0, help="Weight of the router z-loss added in training.")

    def __post_init__(self):
        self._require(self.num_experts >= 1, "num_experts", "must be >= 1")
        self._require(self.top_k >= 1, "top_k", "must be >= 1")
        self._require(self.top_k <= self.num_experts, "top_k", f"must be <= num_experts ({self.num_experts})")
        self._require(self.noise >= 0, "noise", "must be >= 0")
        if isinstance(self.layers, list):
            self._require(all(i >= 0 for i in self.layers), "layers", "layer indices must be >= 0")

    def layer_indices(self, num_layers: int) -> list[int]:
        """The indices of the layers to upcycle, sorted."""
        return list(range(num_layers)) if self.layers == "all" else sorted(set(self.layers))
