"""The one registry of supported model families: model_type -> where things live.

Every other module asks this registry where a model keeps its decoder layers, attention
modules, rotary embedding and MLPs, so that model-specific knowledge lives here only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from .config_base import SpecError


@dataclass(frozen=True)
class Family:
    model_type: str
    base_attr: str = "model"  # attribute of the *ForCausalLM holding the decoder (model.model, model.gpt_neox)
    layers_attr: str = "layers"  # attribute of the decoder holding the list of layers
    attention_attr: str = "self_attn"  # attribute of a layer holding its attention module
    mlp_attr: str = "mlp"  # attribute of a layer holding its MLP
    rotary_attr: str | None = "rotary_emb"  # attribute of the decoder holding the rotary embedding
    mlp_kind: Literal["swiglu", "fused_swiglu", "gelu"] = "swiglu"
    # How the config expresses a sliding window natively: "config" (a `sliding_window` that every
    # layer honours), "layer_types" (Qwen: `use_sliding_window` plus per-layer types), or None.
    native_sliding_window: Literal["config", "layer_types"] | None = None
    moe_model_type: str | None = None  # native MoE family an upcycled model exports to
    rope_types: tuple[str, ...] | None = None  # rope types its config accepts (None: all of transformers')

    def decoder(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.base_attr) if hasattr(model, self.base_attr) else model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.decoder(model), self.layers_attr)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [getattr(layer, self.attention_attr) for layer in self.layers(model)]

    def mlp_modules(self, model: nn.Module) -> list[nn.Module]:
        return [getattr(layer, self.mlp_attr) for layer in self.layers(model)]

    def rotary_embedding(self, model: nn.Module) -> nn.Module | None:
        if self.rotary_attr is None:
            return None
        return getattr(self.decoder(model), self.rotary_attr, None)

    def set_rotary_embedding(self, model: nn.Module, module: nn.Module) -> None:
        setattr(self.decoder(model), self.rotary_attr, module)

    def sliding_window_config(self, config, window: int) -> dict | None:
        """Config values that give every layer a native sliding window of ``window`` keys, or None."""
        if self.native_sliding_window == "config":
            return {"sliding_window": window}
        if self.native_sliding_window == "layer_types":
            return {
                "use_sliding_window": True,
                "sliding_window": window,
                "max_window_layers": 0,
                "layer_types": ["sliding_attention"] * config.num_hidden_layers,
            }
        return None


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", moe_model_type="mixtral"),
        Family("mistral", native_sliding_window="config", moe_model_type="mixtral"),
        Family("qwen2", native_sliding_window="layer_types", moe_model_type="qwen2_moe"),
        Family("qwen3", native_sliding_window="layer_types", moe_model_type="qwen3_moe"),
        # Phi3Config accepts only rope_type default/longrope (it rewrites "yarn" to "longrope").
        Family("phi3", mlp_kind="fused_swiglu", native_sliding_window="config", rope_types=("ntk", "longrope")),
        Family("gemma"),
        Family("gemma2", native_sliding_window="layer_types"),
        Family("granite"),
        Family("cohere"),
        Family("gpt_neox", base_attr="gpt_neox", attention_attr="attention", mlp_kind="gelu"),
    )
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def get_family(model_or_config) -> Family:
    """The registry entry for a model (or its config); a clear error for an unsupported model_type."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise SpecError(
            f"model_type '{model_type}' is not supported; supported families: {', '.join(supported_model_types())}"
        )
    return FAMILIES[model_type]
