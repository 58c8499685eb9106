"""GGUF output for llama.cpp (and the programs built on it: ollama, LM Studio), with the patched rotation.

llama.cpp's ``llama`` architecture rotates pair ``i`` of a head at position ``p`` by ``p * base^(-2i/d) /
rope_freqs[i]`` and scales cos and sin by ``rope.scaling.attn_factor`` (with scaling type ``none``, no other
factor applies). Every static rotation the project produces (each rope type, NTK, a rope stacked on a shipped
one) is one frequency per pair and one attention factor, so it is written exactly that way: the model's own
frequencies at its full context, read off its rotary module, as the per-frequency ``rope_freqs`` tensor, and
its attention factor as ``attn_factor``. A rotation that changes with the length (dynamic NTK, a LongRoPE with
two factor lists) has no such form and is refused.

Two sources:

- a GGUF file (``source=``, the file the model was loaded from): its tensors are copied as they are (quantized
  ones stay quantized), with its tokenizer and metadata; the rope metadata is rewritten;
- the model itself: float tensors (``dtype`` F32 or F16) in llama.cpp's layout (queries and keys permuted to
  its pair order), with the tokenizer of ``tokenizer`` (a folder with ``tokenizer.json``) or of ``tokenizer_gguf``.

The written file also records the applied sections and the config values they replaced (``hf_longctx.config``),
so that ``hf_longctx.from_pretrained(file.gguf)`` loads the original model and re-applies the patch, instead of
reading the rewritten context length with transformers' unscaled rope.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config_base import SpecError

logger = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "mistral")
RECORD_KEY = "hf_longctx.config"
# rope keys of the llama architecture that the rewrite replaces (any other scaling key is dropped)
_ROPE_SCALING = ("rope.scaling.", "rope.scale_linear")


def _gguf():
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - the [gguf] extra
        raise ImportError("writing GGUF needs the gguf package: pip install 'hf-longctx[gguf]'") from err
    return gguf


def rotation(model: nn.Module) -> tuple[float, np.ndarray, float, int]:
    """``(base, rope_freqs, attention factor, context)`` that make llama.cpp rotate as ``model`` does over its
    whole context; raises SpecError where llama.cpp's llama architecture cannot."""
    from ..families import get_family
    from ..patching import base_model
    from ..positions.rope import length_dependent

    target = base_model(model)
    text = target.config.get_text_config(decoder=True)
    if text.model_type not in ARCHITECTURES:
        raise SpecError(f"GGUF output supports the llama architecture ({', '.join(ARCHITECTURES)} models), not "
                        f"'{text.model_type}'")
    params = getattr(text, "rope_parameters", None) or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise SpecError("GGUF output: one rope per layer type has no llama-architecture form")
    if length_dependent(target):
        raise SpecError(f"GGUF output: the rope ({params.get('rope_type')}) changes with the sequence length "
                        "(dynamic NTK or a LongRoPE with two factor lists); llama.cpp's llama architecture has one "
                        "rotation: use a static type (yarn, ntk, linear, llama3)")
    rotary = get_family(target).rotary_embedding(target)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    context = int(text.max_position_embeddings)
    with torch.no_grad():
        cos, _ = rotary(torch.zeros(1, 1, 1), torch.tensor([[0, context - 1]]))
    inv_freq = getattr(rotary, "inv_freq").detach().double().cpu()
    attention = float(getattr(rotary, "attention_scaling", 1.0))
    if 2 * inv_freq.numel() != head_dim or cos.shape[-1] != head_dim:
        raise SpecError(f"GGUF output: llama.cpp's llama architecture rotates the whole head ({head_dim} dims); "
                        f"this model rotates {2 * inv_freq.numel()}")
    base = float(params.get("rope_theta", getattr(text, "rope_theta", 10000.0)))
    unscaled = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return base, (unscaled / inv_freq).float().numpy(), attention, context


def _record(model: nn.Module) -> str:
    """The applied sections and the config values they replaced, as ``save_pretrained`` records them."""
    from ..hub import _as_saved
    from ..patching import applied_sections, base_model

    target = base_model(model)
    with _as_saved(target):
        base = dict(target.config.hf_longctx_base)
    return json.dumps({"hf_longctx": applied_sections(target), "hf_longctx_base": base}, default=str)


def _rope_fields(writer, arch: str, model: nn.Module, rope: tuple) -> np.ndarray | None:
    """Write the rope keys of ``rope`` (:func:`rotation`); the rope_freqs tensor to add (None where every factor
    is 1)."""
    gguf = _gguf()
    base, freqs, attention, context = rope
    writer.add_context_length(context)
    writer.add_rope_freq_base(base)
    writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    writer.add_float32(f"{arch}.rope.scaling.attn_factor", attention)
    writer.add_string(RECORD_KEY, _record(model))
    if np.all(np.abs(freqs - 1.0) <= 1e-6) and attention == 1.0:  # the unscaled rope, up to float32 rounding
        return None
    return freqs


def write_gguf(model: nn.Module, path: str | Path, *, source: str | Path | None = None,
               tokenizer: str | Path | None = None, tokenizer_gguf: str | Path | None = None,
               dtype: str = "f32") -> Path:
    """Write ``model`` (patched or not) as a GGUF file for llama.cpp; see the module docstring.

    ``source``: the GGUF file the model was loaded from (its tensors and tokenizer are kept). Without it the
    model's own weights are written in ``dtype`` (``f32`` or ``f16``) with the tokenizer of the folder
    ``tokenizer`` (``tokenizer.json``) or of the GGUF file ``tokenizer_gguf``.
    """
    path = Path(path)
    rope = rotation(model)  # refuses before anything is written
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        if source is not None:
            _rewrite(model, rope, Path(source), partial)
        else:
            _from_model(model, rope, partial, tokenizer, tokenizer_gguf, dtype)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------- from a GGUF file


def _copy_fields(reader, writer, skip) -> None:
    gguf = _gguf()
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or skip(name):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)


def _rewrite(model: nn.Module, rope: tuple, source: Path, out: Path) -> None:
    gguf = _gguf()
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise SpecError(f"GGUF output: the source {source.name} is a '{arch}' GGUF; the llama architecture is supported")
    _check_shapes(model, reader)
    writer = gguf.GGUFWriter(str(out), arch=arch)
    rope_keys = (f"{arch}.context_length", f"{arch}.rope.freq_base", RECORD_KEY)
    _copy_fields(reader, writer, lambda n: n in rope_keys or any(n.startswith(f"{arch}.{p}") for p in _ROPE_SCALING))
    freqs = _rope_fields(writer, arch, model, rope)
    tensors = [t for t in reader.tensors if t.name != "rope_freqs.weight"]
    for tensor in tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    if freqs is not None:
        writer.add_tensor_info("rope_freqs.weight", freqs.shape, freqs.dtype, freqs.nbytes, gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tensors:
        writer.write_tensor_data(tensor.data)
    if freqs is not None:
        writer.write_tensor_data(freqs)
    writer.close()


def _check_shapes(model: nn.Module, reader) -> None:
    from ..patching import base_model

    text = base_model(model).config.get_text_config(decoder=True)
    values = {name: reader.fields[name].contents() for name in ("llama.block_count", "llama.embedding_length")
              if name in reader.fields}
    wanted = {"llama.block_count": text.num_hidden_layers, "llama.embedding_length": text.hidden_size}
    for key, value in values.items():
        if int(value) != int(wanted[key]):
            raise SpecError(f"GGUF output: the source has {key} = {value}, the model {wanted[key]}: not the same model")


# ------------------------------------------------------------------------------------------ from a model


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotate-half order of a query/key projection -> llama.cpp's interleaved pair order."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    from ..patching import base_model

    target = base_model(model)
    text = target.config.get_text_config(decoder=True)
    out = {}
    for name, tensor in target.state_dict().items():
        short = name.removeprefix("model.")
        if short == "embed_tokens.weight":
            out["token_embd.weight"] = tensor
        elif short == "norm.weight":
            out["output_norm.weight"] = tensor
        elif name == "lm_head.weight":
            if not text.tie_word_embeddings:
                out["output.weight"] = tensor
        elif short.startswith("layers."):
            _, index, rest = short.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            if module not in _NAMES:
                raise SpecError(f"GGUF output: no llama.cpp tensor for '{name}' (a patch that adds weights, such as "
                                "learnable sinks or MoE experts, has no llama-architecture form)")
            if module == "self_attn.q_proj":
                tensor = _permute(tensor, text.num_attention_heads)
            elif module == "self_attn.k_proj":
                tensor = _permute(tensor, text.num_key_value_heads)
            out[f"blk.{index}.{_NAMES[module]}.{kind}"] = tensor
        elif "rotary_emb" not in short:
            raise SpecError(f"GGUF output: no llama.cpp tensor for '{name}'")
    return out


def _from_model(model: nn.Module, rope: tuple, out: Path, tokenizer, tokenizer_gguf, dtype: str) -> None:
    from ..patching import base_model

    gguf = _gguf()
    if dtype not in ("f32", "f16"):
        raise SpecError(f"GGUF output: dtype '{dtype}' is not one of f32, f16")
    text = base_model(model).config.get_text_config(decoder=True)
    arch = "llama"
    writer = gguf.GGUFWriter(str(out), arch=arch)
    writer.add_name(str(getattr(base_model(model).config, "_name_or_path", "") or "hf_longctx model"))
    writer.add_block_count(text.num_hidden_layers)
    writer.add_embedding_length(text.hidden_size)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(text.num_attention_heads)
    writer.add_head_count_kv(text.num_key_value_heads)
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    writer.add_rope_dimension_count(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    writer.add_vocab_size(text.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    freqs = _rope_fields(writer, arch, model, rope)
    _tokenizer_fields(writer, tokenizer, tokenizer_gguf)
    for name, tensor in _tensors(model).items():
        array = tensor.detach().float().cpu().numpy()
        if dtype == "f16" and array.ndim > 1:
            array = array.astype(np.float16)
        writer.add_tensor(name, array)
    if freqs is not None:
        writer.add_tensor("rope_freqs.weight", freqs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tokenizer_fields(writer, tokenizer, tokenizer_gguf) -> None:
    gguf = _gguf()
    if tokenizer_gguf is not None:
        reader = gguf.GGUFReader(str(tokenizer_gguf))
        _copy_fields(reader, writer, lambda n: not n.startswith("tokenizer."))
        return
    if tokenizer is None:
        raise SpecError("GGUF output from a model needs its tokenizer: a folder with tokenizer.json (tokenizer=) or "
                        "a GGUF file to copy it from (tokenizer_gguf=)")
    folder = Path(tokenizer)
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise SpecError(f"GGUF output: the tokenizer in {folder} is {model.get('type')}; byte-level BPE is supported")
    vocab = model["vocab"]
    added = {item["id"]: item for item in data.get("added_tokens", [])}
    size = max(list(vocab.values()) + list(added)) + 1
    tokens, types = [f"[PAD{i}]" for i in range(size)], [gguf.TokenType.UNUSED] * size
    for token, index in vocab.items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for index, item in added.items():
        tokens[index] = item["content"]
        types[index] = gguf.TokenType.CONTROL if item.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    # llama.cpp names its pre-tokenizers by a hash of their output on a test text, which only its converter knows:
    # "default" splits text as GPT-2 does. Token ids given directly are unaffected.
    writer.add_tokenizer_pre("default")
    logger.warning("hf_longctx: the GGUF's pre-tokenizer is llama.cpp's 'default'; give tokenizer_gguf= (a GGUF of "
                   "the same base model) to keep the model's own")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=size).add_to_gguf(writer)


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The ``hf_longctx.config`` record of a GGUF file written by :func:`write_gguf`, or None."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get(RECORD_KEY)
    return None if field is None else json.loads(field.contents())
