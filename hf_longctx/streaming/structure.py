"""What a sink cache needs to know about a model's cache: which layers hold attention keys (and where in them
the rotated part is), which keep a recurrent state of their own.

The layers come from the model's own default cache, built as ``generate`` builds it
(``DynamicCache(config=text config)``): its attention layers (``DynamicLayer``, ``DynamicSlidingWindowLayer``)
are the ones a :class:`~hf_longctx.streaming.SinkCache` replaces; linear-attention, SSM and convolution layers
(``LinearAttentionLayer``: a fixed-size state, whatever the stream's length) and layers without a cache
(``DummyLayer``) are kept as transformers builds them; a layer holding both keys and a recurrent state
(``LinearAttentionAnd*AttentionLayer``, Falcon-H1) gets a sink layer that keeps the state beside the keys.
Any other kind (an indexer cache that grows with the stream) is refused.

The rotary layout is found by running the model twice on the same tokens, at positions ``0..n-1`` and
``delta..delta+n-1``, and asking which rotation of which slice of which cached tensor turns the first
run's cache entries into the second's: a layout is accepted only where it reproduces the model's own
entries, so a re-rotation is exact by construction or the model is refused.
"""

from __future__ import annotations

import weakref
from itertools import product

import torch
from torch import nn
from transformers import cache_utils
from transformers.cache_utils import CacheLayerMixin, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from .. import compat
from ..families import get_family, text_config
from .rotation import RotaryLayout, rotate_keys

ATTENTION_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)  # exactly these classes: subclasses hold more
# keys and a recurrent state in one layer (Falcon-H1): a sink layer that keeps the state beside the keys
HYBRID_LAYERS = tuple(getattr(cache_utils, name) for name in ("LinearAttentionAndFullAttentionLayer",
                                                              "LinearAttentionAndSlidingWindowAttentionLayer")
                      if hasattr(cache_utils, name))
_RECURRENT = cache_utils.LinearAttentionCacheLayerMixin
_DUMMY = getattr(cache_utils, "DummyLayer", None)  # layers without a cache (not in every release)

PROBE_TOKENS = 3
PROBE_SHIFT = 5  # positions: the fastest frequency turns by 5 rad, far from a multiple of 2 pi


def default_layers(model: nn.Module) -> list:
    """The layers of ``model``'s own default cache (what ``generate`` creates when given none)."""
    return DynamicCache(config=text_config(model)).layers


def is_attention_layer(layer) -> bool:
    """A layer whose keys a sink layer holds (with the recurrent state beside them for a hybrid layer)."""
    return type(layer) in ATTENTION_LAYERS + HYBRID_LAYERS


def is_kept_layer(layer) -> bool:
    """A layer the sink cache keeps as transformers builds it: a fixed-size recurrent state or no cache."""
    recurrent = isinstance(layer, _RECURRENT) and not isinstance(layer, CacheLayerMixin)
    return recurrent or _is_dummy(layer)


def unsupported_layers(model: nn.Module) -> list[str]:
    """What the layers a sink cache can neither replace nor keep are, one line per cache-layer class."""
    found: dict[type, list[int]] = {}
    for index, layer in enumerate(default_layers(model)):
        if not is_attention_layer(layer) and not is_kept_layer(layer):
            found.setdefault(type(layer), []).append(index)
    return [f"{cls.__name__} (layers {indices}): it {_why(cls)}" for cls, indices in found.items()]


def _why(cls: type) -> str:
    if issubclass(cls, _RECURRENT):
        return "holds attention keys and a recurrent state in one cache layer"
    if hasattr(cls, "update_indexer"):
        return "also caches an indexer key per token, which grows with the stream"
    return "is not an attention cache layer"


_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, dict[int, RotaryLayout | None]]" = weakref.WeakKeyDictionary()


def rotary_layouts(model: nn.Module, inv_freq: dict) -> dict[int, RotaryLayout | None]:
    """Layer index -> where the rotated keys are in what that layer caches (None: it caches nothing rotated).

    ``inv_freq``: layer type -> the rotary frequencies of that type (:meth:`SinkCache._inv_freq`). Found once
    per model (see the module docstring); raises ValueError when no layout reproduces the model's own cache.
    """
    layouts = _LAYOUTS.get(model)
    if layouts is None:
        layouts = _LAYOUTS[model] = _find_layouts(model, inv_freq)
    return layouts


@torch.no_grad()
def _capture(model: nn.Module, ids: torch.Tensor, shift: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Layer index -> (the two tensors the layer passed to ``Cache.update``) for ``ids`` at ``shift + 0..n-1``."""
    cache = DynamicCache(config=text_config(model))
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    update = cache.update

    def recording_update(key_states, value_states, layer_idx, *args, **kwargs):
        captured.setdefault(layer_idx, (key_states.detach().clone(), value_states.detach().clone()))
        return update(key_states, value_states, layer_idx, *args, **kwargs)

    cache.update = recording_update
    positions = torch.arange(shift, shift + ids.shape[1], device=ids.device)[None]
    model(input_ids=ids, position_ids=positions, use_cache=True, **{compat.CACHE: cache})
    return captured


def _error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max().clamp(min=1e-30)).item()


def _find_layouts(model: nn.Module, inv_freq: dict) -> dict[int, RotaryLayout | None]:
    family = get_family(model)
    config = text_config(model)
    kinds = list(getattr(config, "layer_types", None) or [None] * config.num_hidden_layers)
    nope = set(family.nope_layers(model))
    was_training = model.training
    model.eval()
    try:
        ids = (torch.arange(PROBE_TOKENS, device=model.device) % max(1, config.vocab_size - 3) + 3)[None]
        before, after = _capture(model, ids, 0), _capture(model, ids, PROBE_SHIFT)
    except Exception as err:  # noqa: BLE001  the model itself does not run so: no layout can be verified
        raise ValueError(f"its rotary layout cannot be checked: the model does not run on {PROBE_TOKENS} tokens "
                         f"with its own cache at given positions ({type(err).__name__}: {err})") from err
    finally:
        model.train(was_training)
    dtype = next(iter(before.values()))[0].dtype if before else torch.float32
    tolerance = max(1e-3, 8 * torch.finfo(dtype).eps)
    return {index: None if index in nope else
            _layout_of(index, entries, after[index], inv_freq.get(kinds[index] if index < len(kinds) else None),
                       tolerance)
            for index, entries in before.items()}


def _layout_of(index, before, after, inv_freq, tolerance: float) -> RotaryLayout | None:
    """The layout whose rotation by PROBE_SHIFT turns ``before`` into ``after`` (the other tensor unchanged),
    or None when both are unchanged (a layer that rotates nothing)."""
    unchanged = max(_error(before[0], after[0]), _error(before[1], after[1]))
    if unchanged <= tolerance:
        return None
    if inv_freq is None:
        raise ValueError(f"layer {index}'s cache entries depend on their positions but no rotary embedding with "
                         "inv_freq was found to move them with")
    rotary = 2 * inv_freq.shape[-1]
    angles = (PROBE_SHIFT * inv_freq.double())[None, None].expand(1, before[0].shape[-2], -1)
    best = (unchanged, None)
    for which, interleaved in product((0, 1), (False, True)):
        width = before[which].shape[-1]
        if width < rotary:
            continue
        for start in sorted({0, width - rotary}):
            layout = RotaryLayout(("keys", "values")[which], start, interleaved)
            moved = rotate_keys(before[which], angles.to(before[which].device), layout)
            error = max(_error(moved, after[which]), _error(before[1 - which], after[1 - which]))
            best = min(best, (error, layout), key=lambda pair: pair[0])
    error, layout = best
    if error > tolerance:
        raise ValueError(
            f"layer {index}'s cache entries at positions shifted by {PROBE_SHIFT} are not its entries rotated by "
            f"{PROBE_SHIFT} positions in any slice of what it caches (closest: {layout}, relative error {error:.1e}), "
            "so a sink cache cannot move its cached keys exactly")
    return layout


_CONTINUES: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def continues_in_chunks(model: nn.Module) -> bool:
    """Whether feeding ``model`` an input in chunks of several tokens gives what one pass gives: True without
    recurrent layers; with them, checked once on the model's own default cache (some hybrids continue their
    recurrent state only token by token, or fail on a multi-token input after a cached one)."""
    known = _CONTINUES.get(model)
    if known is None:
        known = _CONTINUES[model] = (not any(is_kept_layer(layer) and not _is_dummy(layer)
                                             for layer in default_layers(model)) or _continues(model))
    return known


def _is_dummy(layer) -> bool:
    return _DUMMY is not None and isinstance(layer, _DUMMY)


@torch.no_grad()
def _continues(model: nn.Module) -> bool:
    was_training = model.training
    model.eval()
    try:
        vocab = text_config(model).vocab_size
        ids = (torch.arange(6, device=model.device) * 7 % max(1, vocab - 3) + 3)[None]
        whole = model(ids).logits[:, -1].float()
        cache = DynamicCache(config=text_config(model))
        model(ids[:, :3], use_cache=True, **{compat.CACHE: cache})
        chunked = model(ids[:, 3:], use_cache=True, **{compat.CACHE: cache}).logits[:, -1].float()
    except Exception:  # noqa: BLE001  the model's own forward fails to continue over several tokens
        return False
    finally:
        model.train(was_training)
    return (chunked - whole).abs().max().item() <= 1e-3 * max(1.0, whole.abs().max().item())
