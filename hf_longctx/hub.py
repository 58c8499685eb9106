"""Save, load and push patched models, with a model card that says what was patched.

``save_pretrained`` writes the model with transformers (safetensors only) and a config.json
that is the native checkpoint wherever a patch has a native form (scaled ``rope_parameters``,
``sliding_window``): plain ``AutoModelForCausalLM.from_pretrained`` gives identical logits
for those. It also records ``hf_longctx`` (the applied sections) and ``hf_longctx_base`` (the
config values the patches changed, as they were before), from which
:func:`from_pretrained` rebuilds the unpatched model and re-applies the spec, so that
everything, ALiBi and learned parameters included, round-trips and ``unpatch`` still works.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig

from .extend import section_from_dual_chunk_config
from .loading import load_config, load_model, resolve
from .patching import applied_sections, base_model, config_before_patches, patch, technique
from .serving import AS_SAVED, Row, serving_rows, serving_table

logger = logging.getLogger(__name__)

EXTRA_WEIGHTS = "hf_longctx_extra.safetensors"  # parameters that live on a wrapper (memory embeddings)
# Config keys that describe the run, not the model; never part of the recorded base config.
_VOLATILE_KEYS = {"hf_longctx", "hf_longctx_base", "_attn_implementation_internal", "_attn_implementation"}


def _changed_config_values(model: nn.Module) -> dict[str, Any]:
    """Config values that patches changed, as they were before the first patch."""
    before, now = config_before_patches(model), model.config.__dict__
    if before is None:
        return {}
    keys = (set(before) | set(now)) - _VOLATILE_KEYS
    # a nested config (the text config of a multimodal model) is recorded as its dict
    return {k: _plain(before.get(k)) for k in sorted(keys) if before.get(k) != now.get(k)}


def _plain(value: Any) -> Any:
    """A config value as config.json holds it (a nested config as its dict)."""
    return value.to_dict() if isinstance(value, PretrainedConfig) else value


def save_pretrained(model: nn.Module, path: str | Path, **kwargs: Any) -> Path:
    """Write ``model`` (patched or not) to ``path`` as safetensors + config.json.

    ``kwargs`` go to transformers' ``save_pretrained``; ``state_dict`` (e.g. the full one gathered
    from FSDP shards) is written instead of the model's own, also by native exports.
    """
    path = Path(path)
    target = base_model(model)
    for name in applied_sections(target):
        native_save = technique(name).save
        if native_save is not None and native_save(model, path, kwargs.get("state_dict")):
            _log_serving(serving(model, json.loads((path / "config.json").read_text())))
            return path
    with _as_saved(target) as rows:
        target.save_pretrained(path, safe_serialization=True, **kwargs)
    _log_serving(rows)
    extra = getattr(model, "hf_longctx_extra_state_dict", None)
    if extra is not None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in extra().items()}
        save_file(tensors, str(path / EXTRA_WEIGHTS), metadata={"format": "pt"})
    return path


@contextlib.contextmanager
def _as_saved(target: nn.Module):
    """The model's config set, for the duration, to what config.json holds (native forms, the recorded base
    values); yields the serving rows of that config."""
    native, rope_in_memory = {}, False
    for name, params in applied_sections(target).items():
        hook = technique(name).native_config
        values = (hook(target, params) if hook is not None else None) or {}
        rope_in_memory = rope_in_memory or (name == "rope" and bool(values))  # rope writes the shipped values
        native.update(values)
    snapshot = config_before_patches(target) if native else {}
    base_values = {**{k: _plain(snapshot.get(k)) for k in native}, **_changed_config_values(target)}
    in_memory = {k: target.config.__dict__.get(k) for k in native}
    target.config.__dict__.update(native, hf_longctx_base=base_values)
    try:
        yield serving_rows(target.config.to_dict(), applied_sections(target), rope_in_memory)
    finally:
        del target.config.hf_longctx_base
        target.config.__dict__.update(in_memory)


def serving(model: nn.Module, config: dict | None = None) -> list[Row]:
    """How vLLM, SGLang and llama.cpp serve the checkpoint :func:`save_pretrained` writes for ``model`` (one
    :class:`~hf_longctx.serving.Row` per engine); ``config``: the config.json already written, if any."""
    target = base_model(model)
    if config is not None:
        return serving_rows(config, applied_sections(target))
    with _as_saved(target) as rows:
        return rows


def _log_serving(rows: list[Row]) -> None:
    for row in rows:
        if row.status != AS_SAVED:
            logger.warning("hf_longctx: %s", row.line())


def from_pretrained(path_or_repo: str | Path, *, gguf_file: str | None = None, **kwargs: Any) -> nn.Module:
    """Load a model saved by :func:`save_pretrained` (or any causal LM) and re-apply its spec.

    ``path_or_repo``: a folder, a Hub repo id or a ``.gguf`` file; ``gguf_file`` names a GGUF
    file inside the folder or repo (see :mod:`hf_longctx.loading`; a GGUF is dequantized to
    ``dtype``, default float32). ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained``
    (``dtype``, ``revision``, ``token``, ...). ``trust_remote_code`` is never enabled unless passed
    explicitly.
    """
    source = resolve(path_or_repo, gguf_file)
    if not source.local and not kwargs.get("local_files_only"):
        # Pin one commit, so that config, weights and patch weights cannot come from two pushes.
        from huggingface_hub import HfApi

        info = HfApi(token=kwargs.get("token")).model_info(source.location, revision=kwargs.get("revision"))
        kwargs = {**kwargs, "revision": info.sha}
    config_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "trust_remote_code") if k in kwargs}
    config = load_config(source, **config_kwargs)
    sections = getattr(config, "hf_longctx", None) or {}
    dual_chunk = getattr(config, "dual_chunk_attention_config", None)
    if dual_chunk and "extend" not in sections:  # a Qwen2.5-1M style checkpoint: its DCA becomes the section
        sections = {**sections, "extend": section_from_dual_chunk_config(dual_chunk)}
    base_values = getattr(config, "hf_longctx_base", None) or {}
    for attr in ("hf_longctx", "hf_longctx_base"):
        if hasattr(config, attr):
            delattr(config, attr)
    for key, value in base_values.items():
        if value is None:
            config.__dict__.pop(key, None)
        elif isinstance(getattr(config, key, None), PretrainedConfig):
            setattr(config, key, type(getattr(config, key)).from_dict(value))
        else:
            setattr(config, key, value)
    model = load_model(source, config=config, **kwargs)
    if not sections:
        return model
    loaded = set(model.state_dict())
    result = patch(model, sections)
    _load_patch_weights(result, source.location, config_kwargs, loaded)
    return result


def _checkpoint_files(path_or_repo: str | Path, names: list[str], hub_kwargs: dict) -> dict[str, Path]:
    """Local paths of the named files that exist in the checkpoint (a folder or a Hub repo)."""
    local = Path(path_or_repo)
    if local.is_dir():
        return {n: local / n for n in names if (local / n).is_file()}
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    found = {}
    for name in names:
        try:
            kw = {k: v for k, v in hub_kwargs.items() if k in ("revision", "token", "cache_dir")}
            found[name] = Path(hf_hub_download(str(path_or_repo), name, **kw))
        except EntryNotFoundError:
            pass
    return found


def _load_patch_weights(model: nn.Module, path_or_repo: str | Path, hub_kwargs: dict, loaded: set[str]) -> None:
    """Load the parameters that patches created (sinks, experts, memory) from the checkpoint.

    transformers loaded the ``loaded`` keys into the unpatched model and skipped the rest;
    the patched model now has those parameters, freshly initialised, so read just them here.
    """
    target = base_model(model)
    index_name = "model.safetensors.index.json"
    files = _checkpoint_files(path_or_repo, ["model.safetensors", index_name, EXTRA_WEIGHTS], hub_kwargs)
    if index_name in files:
        shard_names = sorted(set(json.loads(files[index_name].read_text())["weight_map"].values()))
        weight_files = list(_checkpoint_files(path_or_repo, shard_names, hub_kwargs).values())
    else:
        weight_files = [files["model.safetensors"]] if "model.safetensors" in files else []
    own = target.state_dict()
    for file in weight_files:
        with safe_open(str(file), framework="pt") as checkpoint:
            keys = list(checkpoint.keys())
            unknown = [k for k in keys if k not in own]
            if unknown:
                logger.warning("checkpoint keys not used by the patched model: %s", ", ".join(unknown[:5]))
            with torch.no_grad():
                for key in keys:
                    if key in own and key not in loaded:
                        own[key].copy_(checkpoint.get_tensor(key).to(own[key].dtype))
    if EXTRA_WEIGHTS in files:
        model.load_hf_longctx_extra_state_dict(load_file(str(files[EXTRA_WEIGHTS])))


def model_card(
    model: nn.Module,
    repo_id: str | None = None,
    base_model_name: str | None = None,
    evaluation: dict | None = None,
) -> str:
    """A README.md for the Hub: base model, each applied patch with its parameters, context length."""
    target = base_model(model)
    config = target.config
    text = config.get_text_config(decoder=True)
    base = base_model_name or getattr(config, "_name_or_path", None) or "unknown"
    sections = applied_sections(model)
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- hf-longctx",
        "- long-context",
    ]
    if base and base != "unknown" and not Path(base).exists():
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {type(target).__name__} patched with hf_longctx", ""]
    lines += [f"- **Base model:** `{base}`", f"- **Context length (max_position_embeddings):** {text.max_position_embeddings}"]
    for name, params in sections.items():
        card = technique(name).card
        lines += card(params, target) if card is not None else []
    lines += ["", "## Applied patches", ""]
    if not sections:
        lines.append("None.")
    for name, params in sections.items():
        rendered = ", ".join(f"`{k}` = {v!r}" for k, v in params.items()) or "defaults"
        lines.append(f"- **{name}**: {rendered}")
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "import hf_longctx",
        f"model = hf_longctx.from_pretrained({json.dumps(repo_id or 'path/to/model')})",
        "```",
        "",
        "Scaled RoPE (linear, NTK, dynamic, YaRN, Llama 3, LongRoPE, and a scaling stacked on a shipped one where "
        "a transformers rope type expresses it) and native sliding windows are stored in `config.json` in "
        "transformers' own form, so plain `AutoModelForCausalLM.from_pretrained` loads them too; other patches "
        "are re-applied by `hf_longctx.from_pretrained`.",
    ]
    lines += ["", "## Serving", "",
              "What the inference engines do with this checkpoint (the engine releases are named; each row of "
              "vLLM and SGLang is checked against the engine's own rope code by hf_longctx's tests):", ""]
    lines += serving_table(serving(model))
    if evaluation:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in evaluation.items()]
    return "\n".join(lines) + "\n"


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload model patched with hf_longctx",
    base_model_name: str | None = None,
    evaluation: dict | None = None,
    tokenizer=None,
) -> str:
    """:func:`save_pretrained` + model card, uploaded to ``repo_id``; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (Path(tmp) / "README.md").write_text(model_card(model, repo_id, base_model_name, evaluation), encoding="utf-8")
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
