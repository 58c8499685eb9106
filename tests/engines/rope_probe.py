"""Rotate queries and keys with vLLM's and SGLang's own rope code, as each engine builds it from a saved config.

Runs in the engines' virtualenv (``tests/engines/setup.sh``), not in the project's: it imports neither
hf_longctx nor the test suite, only torch, transformers (the release the engines pin), safetensors and the
engines. Each engine's rotary module is built the way its model file builds it for that architecture (the
file and the lines are named beside each builder), from ``config.json`` loaded by transformers as the engine
loads it, and applied to the given queries and keys at the given positions.

    python rope_probe.py MANIFEST.json OUT_DIR

The manifest lists cases: ``{"name", "dir", "arch", "max_model_len", "inputs"}``; ``inputs`` is a
safetensors file with ``positions`` [T], ``q`` [T, H*D], ``k`` [T, Hkv*D]. For each case and engine the probe
writes ``OUT_DIR/<name>.<engine>.safetensors`` with ``q.<layer type>`` / ``k.<layer type>`` (layer type
``all`` for a flat rope), or ``OUT_DIR/<name>.<engine>.error`` with the exception the engine raised.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig  # noqa: E402


def _text(config):
    return config.get_text_config(decoder=True)


def _head_dim(text) -> int:
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


# ------------------------------------------------------------------------------------------------ vLLM


def _vllm_config(path: str):
    """The config as vLLM loads it (``vllm.transformers_utils.config.get_config``)."""
    from vllm.transformers_utils.config import get_config

    return get_config(path, trust_remote_code=False)


def vllm_ropes(path: str, arch: str, max_model_len: int) -> dict:
    """layer type -> (rope module, forward) as vLLM 0.33 builds them."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    text = _text(_vllm_config(path))
    vllm_config = VllmConfig()
    # what `vllm serve --max-model-len N` sets; the LongRoPE class reads it to choose its factors
    object.__setattr__(vllm_config, "model_config", SimpleNamespace(max_model_len=max_model_len))
    ropes = {}
    with set_current_vllm_config(vllm_config):
        if arch == "gemma3":  # models/gemma3.py: get_rope(head_dim, max_position, config.rope_parameters[layer_type])
            for layer_type in sorted(set(text.layer_types)):
                ropes[layer_type] = get_rope(_head_dim(text), max_position=text.max_position_embeddings,
                                             rope_parameters=text.rope_parameters[layer_type], is_neox_style=True)
        else:  # models/llama.py (phi3.py subclasses it), qwen2.py, stablelm.py: the flat rope_parameters
            kwargs = {}
            if arch == "qwen2":
                kwargs["dual_chunk_attention_config"] = getattr(text, "dual_chunk_attention_config", None)
            ropes["all"] = get_rope(_head_dim(text), max_position=text.max_position_embeddings,
                                    rope_parameters=getattr(text, "rope_parameters", None), **kwargs)
    return {t: (r, r.forward_native if hasattr(r, "forward_native") else r.forward) for t, r in ropes.items()}


# ------------------------------------------------------------------------------------------------ SGLang


def sglang_ropes(path: str, arch: str, max_model_len: int) -> dict:
    """layer type -> (rope module, forward) as SGLang 0.5.23 builds them."""
    from sglang.srt.layers.rotary_embedding import get_rope

    text = _text(AutoConfig.from_pretrained(path))
    head_dim = _head_dim(text)
    ropes = {}
    if arch in ("llama", "phi3"):  # models/llama.py: LlamaDecoderLayer + LlamaAttention
        params = getattr(text, "rope_parameters", None)
        theta = params.get("rope_theta", 10000) if params is not None else getattr(text, "rope_theta", 10000)
        scaling = dict(params) if params is not None else getattr(text, "rope_scaling", None)
        if scaling is not None and getattr(text, "original_max_position_embeddings", None):
            scaling["original_max_position_embeddings"] = text.original_max_position_embeddings
        rotary_dim = int(getattr(text, "partial_rotary_factor", 1) * head_dim)
        ropes["all"] = get_rope(head_dim, rotary_dim=rotary_dim, max_position=getattr(text, "max_position_embeddings", 8192),
                                base=theta, rope_scaling=scaling, is_neox_style=getattr(text, "rope_is_neox_style", True))
    elif arch == "qwen2":  # models/qwen2.py: utils/hf_transformers/common.py get_rope_config(config), whose module
        # imports torchvision: its four lines, (rope_parameters' theta, rope_parameters) where rope_parameters is set
        scaling = getattr(text, "rope_parameters", None)
        theta = scaling.get("rope_theta", getattr(text, "rope_theta", 10000)) if scaling is not None else \
            getattr(text, "rope_theta", 10000)
        scaling = scaling if scaling is not None else getattr(text, "rope_scaling", None)
        ropes["all"] = get_rope(head_dim, rotary_dim=head_dim, max_position=text.max_position_embeddings, base=theta,
                                rope_scaling=scaling,
                                dual_chunk_attention_config=getattr(text, "dual_chunk_attention_config", None))
    elif arch == "gemma3":  # models/gemma3_causal.py: a default rope per layer type, with that type's theta
        params = text.rope_parameters
        for layer_type in sorted(set(text.layer_types)):
            if layer_type == "sliding_attention":
                theta = params["sliding_attention"].get("rope_theta", 10000.0)
            else:
                theta = params["full_attention"].get("rope_theta", 1000000.0)
            ropes[layer_type] = get_rope(head_dim, rotary_dim=head_dim, max_position=text.max_position_embeddings,
                                         base=theta, rope_scaling={"rope_type": "default"},
                                         is_neox_style=getattr(text, "rope_is_neox_style", True))
    elif arch == "stablelm":  # models/stablelm.py: get_rope(head_dim, rotary_ndims, max_position, base=theta)
        partial = getattr(text, "rope_pct", getattr(text, "partial_rotary_factor", 1))
        ropes["all"] = get_rope(head_dim, rotary_dim=int(partial * head_dim), max_position=text.max_position_embeddings,
                                base=text.rope_parameters["rope_theta"])
    else:
        raise ValueError(f"no SGLang builder for arch {arch!r}")
    # SGLang's LongRoPE class has only forward (it chooses its factors per batch); the others have forward_native
    return {t: (r, r.forward_native if hasattr(r, "forward_native") else r.forward) for t, r in ropes.items()}


ENGINES = {"vllm": vllm_ropes, "sglang": sglang_ropes}


def main(manifest: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    versions = {}
    for name in ("vllm", "sglang", "transformers", "torch"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001
            versions[name] = f"unavailable: {err}"
    (out / "versions.json").write_text(json.dumps(versions))
    for case in json.loads(Path(manifest).read_text()):
        inputs = load_file(case["inputs"])
        for engine, build in ENGINES.items():
            stem = out / f"{case['name']}.{engine}"
            try:
                tensors = {}
                for layer_type, (_, forward) in build(case["dir"], case["arch"], case["max_model_len"]).items():
                    q, k = forward(inputs["positions"], inputs["q"].clone(), inputs["k"].clone())
                    tensors[f"q.{layer_type}"] = q.reshape(inputs["q"].shape).contiguous()
                    tensors[f"k.{layer_type}"] = k.reshape(inputs["k"].shape).contiguous()
                save_file(tensors, str(stem) + ".safetensors")
            except Exception:  # noqa: BLE001  recorded: the test decides whether the engine should have served it
                Path(str(stem) + ".error").write_text(traceback.format_exc())


if __name__ == "__main__":
    main(*sys.argv[1:3])
