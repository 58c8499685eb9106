"""How the inference engines users serve with read a saved checkpoint: one row per engine.

Each row says whether the engine serves the checkpoint as saved (the rotation, the attention and the weights
transformers and ``hf_longctx.from_pretrained`` give), serves it differently (and how), or does not serve it.
The rules are what the engines' own code does with ``config.json``, for the releases named in
:data:`ENGINES`; ``tests/test_serving_engines.py`` runs vLLM's and SGLang's rope code on every rope form the
project saves and checks each row against it, both ways (a row that says "as saved" must match to 1e-4 of the
norm, a row that says "differently" must differ).

Architectures outside :data:`CHECKED_ARCHS` are reported ``unverified`` unless the form is known to be served
differently whatever the architecture (dynamic NTK, ALiBi, sinks, memory, ...): no row claims "as saved"
without a check behind it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

AS_SAVED, DIFFERENTLY, NOT_SERVED, UNVERIFIED = "served as saved", "served differently", "not served", "unverified"

# engine key -> the release whose code the rules describe
ENGINES = {
    "vllm": "vLLM 0.33",
    "sglang": "SGLang 0.5.23",
    "llama.cpp": "llama.cpp (convert_hf_to_gguf.py, llama-cpp-python 0.3.36)",
    "gguf": "llama.cpp (hf-longctx GGUF writer)",
}

# model types whose rope construction in each engine was read and is checked by the engine tests
CHECKED_ARCHS = {
    "vllm": {"llama", "qwen2", "phi3", "gemma3", "gemma3_text", "stablelm", "mistral"},
    "sglang": {"llama", "qwen2", "phi3", "gemma3", "gemma3_text", "stablelm", "mistral"},
    "llama.cpp": {"llama", "mistral"},
    "gguf": {"llama", "mistral"},
}


@dataclass
class Row:
    """What one engine does with the checkpoint."""

    engine: str
    status: str = AS_SAVED
    how: list[str] = field(default_factory=list)
    # what one sequence gets, for (a prompt of 1,024 tokens, a prompt of serving_context() tokens): True = the
    # rotation of transformers, False = another rotation, None = the engine cannot rotate it (an error, or reads
    # past the end of its cos/sin cache). Checked by the engine tests.
    alone: tuple = (True, True)

    @property
    def name(self) -> str:
        return ENGINES[self.engine]

    def add(self, status: str, how: str, alone: tuple = (False, False)) -> None:
        rank = {AS_SAVED: 0, UNVERIFIED: 1, DIFFERENTLY: 2, NOT_SERVED: 3}
        if rank[status] > rank[self.status]:
            self.status = status
        self.how.append(how)
        worst = {True: 0, False: 1, None: 2}
        self.alone = tuple(max(a, b, key=worst.__getitem__) for a, b in zip(self.alone, alone))

    def line(self) -> str:
        text = f"{self.name}: {self.status}"
        return text + (": " + "; ".join(self.how) if self.how else "")


# ---------------------------------------------------------------------------------------------- rope


def _text(config: dict) -> dict:
    for key in ("text_config", "language_config", "llm_config"):
        if isinstance(config.get(key), dict):
            return config[key]
    return config


def _rope_layers(text: dict) -> dict[str, dict]:
    """layer type ("all" for a flat rope) -> its rope parameters."""
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    nested = {k: v for k, v in params.items() if isinstance(v, dict)}
    if nested:
        return nested
    flat = dict(params)
    flat.setdefault("rope_theta", text.get("rope_theta", 10000.0))
    return {"all": flat}


def _kind(params: dict) -> str:
    return params.get("rope_type", params.get("type", "default")) or "default"


def longrope_attention(params: dict, max_position: int) -> tuple[float, float, float]:
    """(transformers' attention factor, the engines' short mscale, their long mscale) of a longrope."""
    original = params.get("original_max_position_embeddings") or max_position
    scale = max_position / original
    implied = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))
    factor = params.get("factor")
    if params.get("attention_factor") is not None:
        ours = float(params["attention_factor"])
    else:  # transformers: the factor key, else max_position / original
        ratio = float(factor) if factor is not None else scale
        ours = 1.0 if ratio <= 1.0 else math.sqrt(1 + math.log(ratio) / math.log(original))
    return ours, float(params.get("short_mscale") or implied), float(params.get("long_mscale") or implied)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1.0)


def _rope_rows(text: dict, rows: dict[str, Row]) -> None:
    arch = text.get("model_type", "")
    max_position = int(text.get("max_position_embeddings") or 0)
    layers = _rope_layers(text)
    for layer_type, params in layers.items():
        kind = _kind(params)
        where = "" if layer_type == "all" else f" ({layer_type} layers)"
        scaled = kind != "default"
        original = params.get("original_max_position_embeddings")
        two_lists = kind == "longrope" and params.get("short_factor") != params.get("long_factor")
        for engine in ("vllm", "sglang"):
            row = rows[engine]
            if kind == "dynamic" and engine == "vllm":
                factor = params.get("factor")
                row.add(DIFFERENTLY, f"dynamic NTK{where}: vLLM rotates with the unscaled rope and its cos/sin cache "
                        f"ends at {max_position} positions, while its default --max-model-len is {factor} x "
                        f"{max_position}: past {max_position} tokens it is not served (transformers scales with the "
                        "length there)", alone=(True, None))
                continue
            if kind == "dynamic":
                row.add(DIFFERENTLY, f"dynamic NTK{where}: SGLang uses one fixed NTK base at every length "
                        f"(transformers' rotation at {params.get('factor')} x {max_position} tokens), where "
                        f"transformers keeps the unscaled rope up to {max_position} tokens", alone=(False, True))
                continue
            if engine == "sglang" and scaled and arch in ("gemma3", "gemma3_text"):
                row.add(DIFFERENTLY, f"SGLang builds a default rope for every Gemma 3 layer type: the {kind} "
                        f"scaling{where} is ignored (served unscaled)")
                continue
            if engine == "sglang" and scaled and arch in ("stablelm", "phi"):
                row.add(DIFFERENTLY, f"SGLang's {arch} attention builds an unscaled rope: the {kind} scaling is ignored")
                continue
            if kind == "longrope":
                ours, short, long = longrope_attention(params, max_position)
                if not (_close(ours, long) and (two_lists or _close(ours, short))):
                    row.add(DIFFERENTLY, f"longrope{where} attention factor {long:.4f} (it reads short_mscale/"
                            f"long_mscale or computes them) instead of transformers' {ours:.4f}")
                    continue
                if two_lists and engine == "vllm":
                    row.add(DIFFERENTLY, f"longrope{where}: with --max-model-len above {original}, vLLM rotates every "
                            f"prompt with the long factors (transformers: the short factors up to {original} tokens)",
                            alone=(False, True))
                    continue
                if two_lists and engine == "sglang":
                    row.add(DIFFERENTLY, f"longrope{where}: SGLang switches per batch, so a batch that holds a sequence "
                            f"past position {original} rotates all its sequences with the long factors (transformers: "
                            "by each sequence's own length)", alone=(True, True))
                    continue
            if engine == "vllm" and kind == "linear" and (layer_type == "all" or arch not in ("gemma3", "gemma3_text")):
                row.how.append(f"vLLM's default --max-model-len multiplies max_position_embeddings by the linear "
                               f"factor again ({max_position} x {params.get('factor')}): serve with --max-model-len "
                               f"{max_position}")
            if arch not in CHECKED_ARCHS[engine] and scaled:
                row.add(UNVERIFIED, f"the {kind} rope{where} of a {arch} model is not checked against {ENGINES[engine]}",
                        alone=(True, True))
        _gguf_rope_rows(arch, kind, params, where, rows, two_lists)


def _gguf_rope_rows(arch: str, kind: str, params: dict, where: str, rows: dict[str, Row], two_lists: bool) -> None:
    converter, ours = rows["llama.cpp"], rows["gguf"]
    if kind == "dynamic":
        converter.add(DIFFERENTLY, f"dynamic NTK{where} is dropped by the converter (served unscaled)")
        ours.add(NOT_SERVED, "dynamic NTK has no fixed rotation; the GGUF writer refuses it")
    elif kind == "longrope" and arch != "phi3":
        converter.add(DIFFERENTLY, f"the converter writes longrope factors{where} only for Phi-3: on {arch} they are "
                      "dropped (served unscaled); write the GGUF with hf-longctx instead")
        if two_lists:
            ours.add(NOT_SERVED, "a LongRoPE with two factor lists switches with the length; llama.cpp's llama "
                     "architecture has one rotation")
    elif kind == "longrope" and two_lists:
        ours.add(NOT_SERVED, "a LongRoPE with two factor lists: convert with llama.cpp's converter (Phi-3)")
    elif kind == "yarn" and (params.get("attention_factor") is not None or params.get("mscale")):
        converter.add(DIFFERENTLY, f"yarn{where}: llama.cpp computes the attention factor from the factor and "
                      "ignores an explicit attention_factor / mscale")
    if kind not in ("default", "dynamic") and arch not in CHECKED_ARCHS["llama.cpp"]:
        converter.add(UNVERIFIED, f"the {kind} rope of a {arch} model is not checked against llama.cpp")
        ours.add(NOT_SERVED, f"the GGUF writer supports {', '.join(sorted(CHECKED_ARCHS['gguf']))}, not {arch}")


# ------------------------------------------------------------------------------------ patched sections


def _section_rows(config: dict, sections: dict[str, Any], rope_in_memory: bool, rows: dict[str, Row]) -> None:
    text = _text(config)
    everyone = list(rows.values())
    if rope_in_memory:
        # below the trained length a dynamic section rotates as the shipped rope; the patched context is longer than
        # the shipped one, past the end of the engine's cos/sin cache
        dynamic = (sections.get("rope") or {}).get("type") == "dynamic"
        for row in everyone:
            row.add(DIFFERENTLY, "the scaled rope has no rope type of transformers and is held in memory: config.json "
                    "keeps the shipped rope and context, which the engine serves (hf_longctx.from_pretrained re-applies "
                    "the patch)", alone=(dynamic, None))
    if "alibi" in sections:
        for row in everyone:
            row.add(DIFFERENTLY, "ALiBi is applied by hf_longctx only: the engine serves the rotary model")
    attention = sections.get("attention") or {}
    if attention.get("sink_tokens") or attention.get("learnable_sinks"):
        for row in everyone:
            row.add(DIFFERENTLY, "attention sinks are applied by hf_longctx only (the engine attends without them)")
    elif attention.get("sliding_window") and not _native_window(text, attention["sliding_window"]):
        for row in everyone:
            row.add(DIFFERENTLY, "the sliding window is applied by hf_longctx only (config.json cannot hold it for "
                    "this family): the engine attends over the full context")
    elif attention.get("sliding_window"):
        _window_rows(text, rows)
    if "streaming" in sections:
        for row in everyone:
            row.add(DIFFERENTLY, "the streaming attention-sink cache is hf_longctx's: the engine keeps the whole KV "
                    "cache (same outputs inside the window, different beyond it)")
    extend = sections.get("extend") or {}
    if extend.get("method") == "self_extend":
        for row in everyone:
            row.add(DIFFERENTLY, "Self-Extend is applied by hf_longctx only: past the trained length the engine "
                    "attends with the plain positions")
    elif extend.get("method") == "dual_chunk":
        rows["vllm"].add(NOT_SERVED, "vLLM removed its dual-chunk attention backend (v0.11): "
                         "dual_chunk_attention_config is not served")
        if text.get("model_type") in ("qwen2", "qwen2_moe"):
            rows["sglang"].add(DIFFERENTLY, "SGLang serves dual_chunk_attention_config on CUDA only (its dual-chunk "
                               "flash-attention backend); elsewhere it attends with plain positions")
        else:
            rows["sglang"].add(NOT_SERVED, "SGLang serves dual_chunk_attention_config for Qwen2 / Qwen2-MoE only")
        for key in ("llama.cpp", "gguf"):
            rows[key].add(DIFFERENTLY, "llama.cpp has no dual-chunk attention: it attends with plain positions")
    if "memory" in sections:
        for row in everyone:
            row.add(NOT_SERVED, "recurrent memory (RMT) is a wrapper of hf_longctx's: no engine runs it")
    moe = sections.get("moe")
    if moe is not None and not _native_moe(config):
        for row in everyone:
            row.add(NOT_SERVED, "the upcycled MoE layers have no native form for this family: the checkpoint's "
                    "expert weights are hf_longctx's")


def _native_window(text: dict, window: int) -> bool:
    return text.get("sliding_window") == window


def _window_rows(text: dict, rows: dict[str, Row]) -> None:
    arch = text.get("model_type", "")
    if arch in ("qwen2", "qwen3") and text.get("use_sliding_window") and \
            text.get("max_window_layers") != text.get("num_hidden_layers"):
        rows["vllm"].add(NOT_SERVED, f"vLLM's {arch} refuses a sliding window on some layers only "
                         "(max_window_layers != num_hidden_layers)")
    for row in rows.values():
        if row.status != NOT_SERVED:
            row.add(UNVERIFIED, f"the native sliding window of a {arch} model is not checked against {row.name}",
                    alone=(True, True))


def _native_moe(config: dict) -> bool:
    return _text(config).get("model_type") in ("mixtral", "qwen2_moe", "qwen3_moe")


# ------------------------------------------------------------------------------------------- entry


def serving_context(config: dict) -> int:
    """The longest prompt the checkpoint is meant for: ``max_position_embeddings``, times the factor of a
    dynamic NTK rope (which keeps the trained length there)."""
    text = _text(config)
    context = int(text.get("max_position_embeddings") or 0)
    layers = _rope_layers(text)
    dynamic = [p.get("factor") or 1.0 for p in layers.values() if _kind(p) == "dynamic"]
    sections = config.get("hf_longctx") or {}
    if (sections.get("rope") or {}).get("type") == "dynamic":
        dynamic.append(sections["rope"].get("factor") or 1.0)
    return int(round(context * max(dynamic))) if dynamic else context


def serving_rows(config: dict, sections: dict[str, Any] | None = None, rope_in_memory: bool = False) -> list[Row]:
    """One :class:`Row` per engine for a checkpoint whose config.json is ``config`` (a dict), patched with
    ``sections`` (``config["hf_longctx"]`` by default); ``rope_in_memory``: the rope section is held in memory
    (config.json keeps the shipped rope)."""
    sections = config.get("hf_longctx") or {} if sections is None else sections
    rows = {key: Row(key) for key in ENGINES}
    if not rope_in_memory:
        _rope_rows(_text(config), rows)
    _section_rows(config, sections, rope_in_memory, rows)
    return list(rows.values())


def serving_table(rows: list[Row]) -> list[str]:
    """The model card's Serving table (markdown lines)."""
    lines = ["| engine | serves this checkpoint | how |", "|---|---|---|"]
    for row in rows:
        how = "; ".join(row.how) or "rotation, attention and weights as transformers loads them"
        lines.append(f"| {row.name} | {row.status} | {how} |")
    return lines
