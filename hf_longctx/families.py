"""Model families, found from the model's structure; a short table of what structure cannot tell.

Every other module asks a :class:`Family` where a model keeps its decoder, its layers, each
layer's attention module, its rotary embedding(s) and its MLPs. ``get_family`` finds them the
same way for every model type, by inspecting the module tree:

- the decoder is the module that holds the input embedding (``get_input_embeddings()``) next to
  a list of layers; the layers are that ``ModuleList`` (``model.layers``, ``transformer.h``, ...);
- a layer's attention module is the child whose ``forward`` calls transformers'
  ``ALL_ATTENTION_FUNCTIONS`` (so that an attention patch really reaches it); layers without one
  (Mamba, linear attention, convolution) are left to their own mixers;
- rotary embeddings are the modules under the decoder whose class is a ``*RotaryEmbedding``
  (one shared, one per attention module, or one per theta);
- a layer's MLP is its ``mlp`` / ``feed_forward`` / ``ffn`` / ``block_sparse_moe`` child.

``_EXCEPTIONS`` keeps only what cannot be inferred: how a config expresses a native sliding
window, which native MoE family an upcycled model exports to, and which layers skip the
rotation where the config does not say so itself. A model type that follows transformers'
usual layout needs no entry; a model whose structure cannot be understood gets a
:class:`SpecError` that names the part that was not found.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from .config_base import SpecError

MlpKind = Literal["gated", "fused_gated", "plain"]

_ATTENTION_NAMES = ("self_attn", "self_attention", "attention", "attn")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")
_MLP_CLASS_WORDS = ("mlp", "moe", "feedforward", "experts")


@dataclass(frozen=True)
class Traits:
    """What the module tree and the config cannot tell about a model type."""

    # How the config expresses a sliding window natively: "config" (a `sliding_window` that every
    # layer honours), "layer_types" (Qwen/Gemma 2: `use_sliding_window` plus per-layer types), or None.
    native_sliding_window: Literal["config", "layer_types"] | None = None
    moe_model_type: str | None = None  # native MoE family an upcycled model exports to
    rope_types: tuple[str, ...] | None = None  # rope types it accepts (None: every type of transformers)
    # Layers that skip the rotation although the config names no NoPE layers (Cohere 2: its full
    # attention layers rotate only when they have no window): (config, layer type) -> True for NoPE.
    nope_layer: Callable[[object, str], bool] | None = None


def _full_layers_without_rope(config, layer_type: str) -> bool:
    """Cohere 2, Exaone 4, Flint: with a sliding window configured, only the sliding layers rotate."""
    return layer_type == "full_attention" and getattr(config, "sliding_window", None) is not None


_EXCEPTIONS: dict[str, Traits] = {
    "llama": Traits(moe_model_type="mixtral"),
    "mistral": Traits(native_sliding_window="config", moe_model_type="mixtral"),
    "qwen2": Traits(native_sliding_window="layer_types", moe_model_type="qwen2_moe"),
    "qwen3": Traits(native_sliding_window="layer_types", moe_model_type="qwen3_moe"),
    "phi3": Traits(native_sliding_window="config"),
    "gemma2": Traits(native_sliding_window="layer_types"),
    "cohere2": Traits(nope_layer=_full_layers_without_rope),
    "exaone4": Traits(nope_layer=_full_layers_without_rope),
    "flint": Traits(nope_layer=_full_layers_without_rope),
}


@dataclass(frozen=True)
class Family:
    """Where one model keeps its parts. Paths are dotted attribute paths (``"model.language_model"``)."""

    model_type: str
    decoder_path: str  # from the causal LM to the decoder ("" when the causal LM is the decoder)
    layers_attr: str  # attribute of the decoder holding the list of layers
    attention_attr: str  # attribute of a layer holding its attention module (absent on attention-free layers)
    mlp_attr: str | None  # attribute of a layer holding its MLP, or None when the layers have none
    rotary_paths: tuple[str, ...] = ()  # from the decoder to each rotary embedding
    mlp_kind: MlpKind | None = None  # form of the first layer's dense MLP (None: not a dense MLP)
    native_sliding_window: Literal["config", "layer_types"] | None = None
    moe_model_type: str | None = None
    rope_types: tuple[str, ...] | None = None  # rope types it accepts (None: every type of transformers)
    nope_layer: Callable[[object, str], bool] | None = None

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.decoder_path)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.decoder(model), self.layers_attr)

    def attention_layer_indices(self, model: nn.Module) -> list[int]:
        """Indices of the layers that have an attention module (all of them except in hybrid models)."""
        return [i for i, layer in enumerate(self.layers(model)) if hasattr(layer, self.attention_attr)]

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        layers = self.layers(model)
        return [getattr(layers[i], self.attention_attr) for i in self.attention_layer_indices(model)]

    def mlp_modules(self, model: nn.Module) -> list[nn.Module]:
        if self.mlp_attr is None:
            raise SpecError(f"cannot find an MLP in the layers of {type(model).__name__} (model_type "
                            f"'{self.model_type}'): no child named {', '.join(_MLP_NAMES)}")
        return [getattr(layer, self.mlp_attr) for layer in self.layers(model)]

    def rotary_embeddings(self, model: nn.Module) -> dict[str, nn.Module]:
        """Every rotary embedding, by its path from the decoder."""
        decoder = self.decoder(model)
        return {path: decoder.get_submodule(path) for path in self.rotary_paths}

    def rotary_embedding(self, model: nn.Module) -> nn.Module | None:
        """The decoder's own (shared) rotary embedding, else the first one found, or None."""
        return next(iter(self.rotary_embeddings(model).values()), None)

    def set_rotary_embedding(self, model: nn.Module, module: nn.Module, path: str | None = None) -> None:
        """Put ``module`` at ``path`` (default: the one :meth:`rotary_embedding` returns)."""
        path = self.rotary_paths[0] if path is None else path
        parent, _, name = path.rpartition(".")
        owner = self.decoder(model).get_submodule(parent)
        if isinstance(owner, nn.ModuleList):
            owner[int(name)] = module
        else:
            setattr(owner, name, module)

    def layer_types(self, model: nn.Module) -> list[str]:
        """Each layer's attention type (``config.layer_types``; ``full_attention`` where there are none)."""
        config = text_config(model)
        types = getattr(config, "layer_types", None)
        return list(types) if types else ["full_attention"] * len(self.layers(model))

    def nope_layers(self, model: nn.Module) -> list[int]:
        """Indices of the attention layers that apply no rotation (NoPE)."""
        config = text_config(model)
        types = self.layer_types(model)
        flags = getattr(config, "no_rope_layers", None)  # SmolLM3, Llama 4: 1 rotates, 0 does not
        thetas = getattr(config, "layer_rope_theta", None)  # Granite SWA: theta 0 means NoPE
        layers = self.layers(model)
        nope = []
        for i in self.attention_layer_indices(model):
            attention = getattr(layers[i], self.attention_attr)
            if (getattr(attention, "use_rope", True) is False or (flags is not None and not flags[i])
                    or (thetas is not None and not thetas[i])
                    or (self.nope_layer is not None and self.nope_layer(config, types[i]))):
                nope.append(i)
        return nope

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


def text_config(model_or_config):
    """The config of the text decoder (the model's own config, or its ``text_config``)."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config(decoder=True)


@functools.lru_cache(maxsize=None)
def _calls_attention_interface(cls: type) -> bool:
    """True when ``cls.forward`` dispatches through transformers' ``ALL_ATTENTION_FUNCTIONS``."""
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _attention_child(layer: nn.Module) -> str | None:
    found = [name for name, child in layer.named_children() if _calls_attention_interface(type(child))]
    preferred = [name for name in _ATTENTION_NAMES if name in found]
    return (preferred or found or [None])[0]


def _mlp_child(layer: nn.Module, attention: str) -> str | None:
    names = dict(layer.named_children())
    for name in _MLP_NAMES:
        if name in names:
            return name
    for name, child in names.items():
        if name != attention and any(w in type(child).__name__.lower() for w in _MLP_CLASS_WORDS):
            return name
    return None


def _find_decoder(model: nn.Module) -> tuple[str, str]:
    """(path of the decoder, name of its layer list): the module holding the input embedding and layers."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    if embedding is None:
        raise SpecError(f"cannot find the input embedding of {type(model).__name__}: get_input_embeddings() "
                        "returns nothing, so the decoder cannot be located")
    owners = [path for path, module in model.named_modules()
              if any(child is embedding for child in module.children())]
    for path in sorted(owners, key=lambda p: -p.count(".")):  # the innermost owner first
        # from the embedding's owner up to the causal LM: the first module with a list of attention layers
        parts = path.split(".") if path else []
        for depth in range(len(parts), -1, -1):
            candidate = ".".join(parts[:depth])
            lists = [name for name, child in model.get_submodule(candidate).named_children()
                     if isinstance(child, nn.ModuleList) and any(_attention_child(item) for item in child)]
            if len(lists) == 1:
                return candidate, lists[0]
    raise SpecError(f"cannot find the decoder layers of {type(model).__name__}: no module next to its input "
                    "embedding holds one list of layers whose attention calls transformers' AttentionInterface")


def _is_rotary(module: nn.Module) -> bool:
    return type(module).__name__.lower().endswith("rotaryembedding")


def discover(model: nn.Module) -> Family:
    """The :class:`Family` of ``model``, found from its module tree and config (see the module docstring)."""
    config = text_config(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    decoder_path, layers_attr = _find_decoder(model)
    decoder = model.get_submodule(decoder_path)
    layers = getattr(decoder, layers_attr)
    attention_names = {_attention_child(layer) for layer in layers} - {None}
    if len(attention_names) != 1:
        raise SpecError(f"cannot find one attention module per layer in {type(model).__name__}: the layers' "
                        f"attention children are named {sorted(attention_names)}")
    attention_attr = attention_names.pop()
    first = next(layer for layer in layers if hasattr(layer, attention_attr))
    mlp_attr = _mlp_child(first, attention_attr)
    found = [path for path, module in decoder.named_modules() if path and _is_rotary(module)]
    # a rotary inside another (ALiBi's identity wraps the original) is not one of the model's own
    rotary_paths = tuple(p for p in found if not any(p.startswith(q + ".") for q in found))
    mlp_kind = None
    if mlp_attr is not None:
        from .moe.layer import dense_layout  # moe imports families: resolve at call time

        layout = dense_layout(getattr(first, mlp_attr))
        mlp_kind = layout.kind if layout is not None else None
    traits = _EXCEPTIONS.get(model_type, Traits())
    return Family(
        model_type=model_type,
        decoder_path=decoder_path,
        layers_attr=layers_attr,
        attention_attr=attention_attr,
        mlp_attr=mlp_attr,
        rotary_paths=rotary_paths,
        mlp_kind=mlp_kind,
        native_sliding_window=traits.native_sliding_window,
        moe_model_type=traits.moe_model_type,
        rope_types=traits.rope_types,
        nope_layer=traits.nope_layer,
    )


_CACHE: "weakref.WeakKeyDictionary[nn.Module, Family]" = weakref.WeakKeyDictionary()


def get_family(model_or_config) -> Family:
    """The :class:`Family` of a model (found once per model object), or of a config (from a meta-device
    model built from it). Raises a SpecError naming the part of the structure that was not found."""
    if not isinstance(model_or_config, nn.Module):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return discover(AutoModelForCausalLM.from_config(model_or_config))
    family = _CACHE.get(model_or_config)
    if family is None:
        family = _CACHE[model_or_config] = discover(model_or_config)
    return family


FAMILIES: dict[str, Traits] = _EXCEPTIONS  # the exceptions table; every other model type is found by structure


def supported_model_types() -> list[str]:
    """The causal-LM model types of the installed transformers whose attention modules call the
    AttentionInterface (checked on their classes, without building a model)."""
    return sorted(_interface_model_types())


@functools.lru_cache(maxsize=None)
def _interface_model_types() -> frozenset[str]:
    """Model types whose modeling file uses ALL_ATTENTION_FUNCTIONS (read as text: importing ~200
    modeling modules would take far longer than the answer is worth)."""
    import importlib.util
    from pathlib import Path

    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = set()
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        module = model_type_to_module_name(model_type)
        spec = importlib.util.find_spec(f"transformers.models.{module}")
        source = Path(next(iter(spec.submodule_search_locations))) / f"modeling_{module}.py" if spec else None
        if source is not None and source.is_file() and "ALL_ATTENTION_FUNCTIONS" in source.read_text():
            found.add(model_type)
    return frozenset(found)
