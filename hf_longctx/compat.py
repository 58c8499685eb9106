"""What differs between the transformers releases hf_longctx supports (5.14 up to the newest 5.x).

Every difference the package depends on is named here once, found by looking at transformers
itself (a field or argument that exists or not) rather than by comparing version numbers, so a
backport or a pre-release is handled as what it is:

* :data:`CACHE`: the name of the KV cache, both as the keyword that a model's ``forward`` and
  ``generate`` take and as the field of its output. 5.24 renamed ``past_key_values`` to
  ``cache`` (the old name still works there, with a warning, until 5.40); before 5.24 only
  ``past_key_values`` exists, and a ``cache=`` keyword is swallowed by ``**kwargs`` without
  error: the model silently runs without the cache.
* :data:`ACTIVATION_CHECKPOINTING`: the ``TrainingArguments`` field that turns on activation
  checkpointing. 5.24 calls it ``activation_checkpointing`` (with ``gradient_checkpointing``
  a deprecated alias); 5.17 and before have only ``gradient_checkpointing``. Recipe configs use the new name; :func:`training_argv` translates it for the parser.

Everything else hf_longctx uses (``AttentionInterface``, ``AttentionMaskInterface`` and its mask
functions, ``ROPE_INIT_FUNCTIONS``, ``CacheLayerMixin``, ``rope_parameters``) works unchanged on
every supported release: the second CI environment runs the whole test suite on the lowest one.
Below 5.14 it does not (``CacheLayerMixin`` wants ``get_max_cache_shape`` instead of
``get_max_length``; below 5.5 the mask functions and ``Cache.update`` take other arguments).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import TrainingArguments
from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE: str = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# Every name a cache may be passed under to forward/generate on a supported release (the new one, the alias).
CACHE_KEYWORDS: tuple[str, ...] = ("cache", "past_key_values")


def passed_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a call's keyword arguments pass, under either name, or None."""
    return next((kwargs[k] for k in CACHE_KEYWORDS if kwargs.get(k) is not None), None)


def cache_of(output: Any) -> Any:
    """The KV cache a model output carries (a ``Cache``), or None when it has none."""
    return output.get(CACHE)


_TRAINING_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}

ACTIVATION_CHECKPOINTING: str = (
    "activation_checkpointing" if "activation_checkpointing" in _TRAINING_FIELDS else "gradient_checkpointing"
)

# Newer TrainingArguments names -> the name this release has (empty on the newest releases).
TRAINING_ARGUMENT_RENAMES: dict[str, str] = {
    name: old
    for name, old in (("activation_checkpointing", ACTIVATION_CHECKPOINTING),)
    if name != old
}


def training_argv(argv: list[str]) -> list[str]:
    """``--name value`` command-line arguments with each newer ``TrainingArguments`` name
    replaced by the one this transformers release has (``--name=value`` included)."""
    renamed = []
    for arg in argv:
        option, sep, value = arg.partition("=")
        name = option[2:] if option.startswith("--") else None
        renamed.append(f"--{TRAINING_ARGUMENT_RENAMES[name]}{sep}{value}" if name in TRAINING_ARGUMENT_RENAMES else arg)
    return renamed
