"""The ``extend`` section (Self-Extend, Dual Chunk Attention) against a from-scratch reference of each rule.

The reference is written here from the papers' definitions: it undoes the model's rotation of every
query and key (float64), and for each query i and key j rotates the query by the rule's relative
position and takes the dot product with the unrotated key, in a dense [N, M] softmax. The library
computes the same thing by re-rotating already rotated vectors in passes merged by log-sum-exp.
"""

import copy
import json

import pytest
import torch
from conftest import tokens
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

import hf_longctx
from hf_longctx import SpecError
from hf_longctx.compat import CACHE, cache_of
from hf_longctx.evaluation import perplexity_vs_length
from hf_longctx.families import get_family
from hf_longctx.extend import attention as extend_attention
from hf_longctx.testing import tiny_model

SELF_EXTEND = {"method": "self_extend", "group_size": 3, "window": 6}  # 40 = 6 blocks of 6 + 4
DUAL_CHUNK = {"method": "dual_chunk", "chunk_size": 12, "local_size": 4}  # chunks of 8 tokens
T = 40  # several groups and chunks, and beyond the successive chunk


def relative_position(section: dict, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """The rule as the papers state it, for query position i and key position j <= i."""
    if section["method"] == "self_extend":
        g, w = section["group_size"], section["window"]
        return torch.where(i - j < w, i - j, i // g - j // g + w - w // g)  # LongLM
    size, local = section["chunk_size"], section["local_size"]
    chunk = size - local
    same, previous = i // chunk == j // chunk, i // chunk - j // chunk == 1
    successive = torch.clamp(i % chunk + chunk, max=size) - j % chunk  # DCA / Qwen2.5-1M
    inter = min(2 * chunk - 1, size) - j % chunk
    return torch.where(same, i - j, torch.where(previous, successive, inter))


def _turn(x, angle):
    """Half-split rotation of x [..., D] by angle [..., D/2] (transformers' rotate_half layout), from scratch."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], dim=-1)


def reference_implementation(model, section: dict) -> str:
    """Register the dense reference of ``section`` as an attention implementation for ``model``."""
    inv_freq = get_family(model).rotary_embedding(model).inv_freq.double()
    rot = 2 * inv_freq.shape[0]  # partial rotary: the first rot dims turn, the rest pass
    name = f"test_extend_reference_{id(model)}"

    def turn(x, angle):
        turned = _turn(x[..., :rot], angle)
        return torch.cat([turned, x[..., rot:].expand(*turned.shape[:-1], -1)], dim=-1)

    def attention(module, query, key, value, attention_mask, scaling=None, position_ids=None, **kwargs):
        b, hq, n, d = query.shape
        m = key.shape[2]
        q_pos = position_ids.expand(b, n).double()
        k_pos = torch.arange(m, dtype=torch.float64).expand(b, m)  # no padding here: keys are tokens 0..M-1
        q = turn(query.double(), -q_pos[:, None, :, None] * inv_freq)  # the raw (unrotated) vectors
        k = turn(key.double(), -k_pos[:, None, :, None] * inv_freq)
        k = k.repeat_interleave(hq // key.shape[1], dim=1)
        v = value.double().repeat_interleave(hq // key.shape[1], dim=1)
        i, j = q_pos[:, None, :, None], k_pos[:, None, None, :]
        rel = relative_position(section, i.long(), j.long()).double()  # [B, 1, N, M]
        q_rel = turn(q[:, :, :, None, :], rel[..., None] * inv_freq)  # [B, H, N, M, D]
        scores = (q_rel * k[:, :, None]).sum(-1) * scaling
        scores = scores.masked_fill(j > i, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        return out.transpose(1, 2).to(query.dtype).contiguous(), None

    AttentionInterface.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name


def pair(model_type: str, section: dict, **overrides):
    """(patched model, reference model) from the same random weights."""
    model = tiny_model(model_type, **overrides)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation(reference_implementation(reference, section))
    return hf_longctx.patch(model, {"extend": section}), reference


def close(a, b, tol=1e-4):
    return ((a - b).abs().max() / b.abs().max()).item() <= tol


def _use(form: str, monkeypatch) -> str:
    if form == "fused":  # the Triton kernel, as on CUDA (here in the interpreter)
        monkeypatch.setattr(extend_attention, "FUSED", True)
        return form
    if form != "single_pass":
        monkeypatch.setattr(extend_attention, "_SINGLE_PASS_ELEMENTS", 0)
    if form.startswith("blocks_of_"):
        monkeypatch.setattr(extend_attention, "BAND_AND_LAG", False)
        monkeypatch.setattr(extend_attention, "BLOCK_SIZE", int(form.rsplit("_", 1)[1]))
    return form


@pytest.fixture(params=["single_pass", "blocks_of_7", "blocks_of_2", "band_and_lag"])
def path(request, monkeypatch):
    """Every form of the attention: one softmax over all keys; passes in blocks merged by log-sum-exp (blocks
    wider than the window: masked tiles; narrower: causal, anticausal and full tiles); Self-Extend's prefill
    as a sliding window and one causal call (dual_chunk takes the blocks there). The Triton kernel's path (CUDA's)
    runs in the interpreter through `forms` and the fused tests below, which keeps the suite's time in bounds."""
    return _use(request.param, monkeypatch)


@pytest.fixture(params=["single_pass", "blocks_of_2", "band_and_lag", "fused"])
def forms(request, monkeypatch):
    return _use(request.param, monkeypatch)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("section", [SELF_EXTEND, DUAL_CHUNK], ids=["self_extend", "dual_chunk"])
def test_prefill_equals_reference(model_type, section, path):
    model, reference = pair(model_type, section)
    ids = tokens(2, T)
    with torch.no_grad():
        got, want, plain = model(ids).logits, reference(ids).logits, None
        hf_longctx.unpatch(model)
        plain = model(ids).logits
    assert close(got, want)
    assert not close(plain, want, 1e-3), ((plain - want).abs().max() / want.abs().max()).item()  # the rule matters here


@pytest.mark.parametrize("model_type", ["phi", "stablelm"])
def test_partial_rotary_prefill_equals_reference(model_type, path):
    """Phi (half of each head rotates) and StableLM (a quarter): only the rotary dims are re-rotated."""
    model, reference = pair(model_type, SELF_EXTEND)
    ids = tokens(1, T)
    with torch.no_grad():
        assert close(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("section", [{**SELF_EXTEND, "window": T}, {**DUAL_CHUNK, "chunk_size": T + 4}],
                         ids=["self_extend", "dual_chunk"])
def test_equal_to_plain_inside_exact_span(model_type, section, forms):
    model = tiny_model(model_type)
    ids = tokens(2, T)
    with torch.no_grad():
        plain = model(ids).logits
        got = hf_longctx.patch(model, {"extend": section})(ids).logits
    assert close(got, plain)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("section", [SELF_EXTEND, DUAL_CHUNK], ids=["self_extend", "dual_chunk"])
@pytest.mark.parametrize("fused", [False, True], ids=["cpu", "fused"])
def test_cached_decoding_equals_reference(model_type, section, fused, monkeypatch):
    monkeypatch.setattr(extend_attention, "FUSED", fused)
    model, reference = pair(model_type, section)
    ids = tokens(1, 30)
    prompt = 13
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(ids[:, :prompt], **{CACHE: cache}, use_cache=True)
        assert close(out.logits, reference(ids[:, :prompt]).logits)
        for t in range(prompt, ids.shape[1]):
            step = model(ids[:, t:t + 1], **{CACHE: cache_of(out)}, use_cache=True)
            assert close(step.logits[:, -1], reference(ids[:, :t + 1]).logits[:, -1]), t
            out = step


@pytest.mark.parametrize("section", [SELF_EXTEND, DUAL_CHUNK], ids=["self_extend", "dual_chunk"])
def test_left_padded_batch_equals_each_prompt_alone(section, forms):
    model = hf_longctx.patch(tiny_model("llama"), {"extend": section})
    lengths = (T, T - 11)
    prompts = [tokens(1, n, seed=s)[0] for s, n in enumerate(lengths)]
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, T - len(prompt):], mask[row, T - len(prompt):] = prompt, 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=position_ids).logits
        for row, prompt in enumerate(prompts):
            alone = model(prompt[None]).logits[0]
            assert close(batch[row, T - len(prompt):], alone)
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for row, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], max_new_tokens=6, do_sample=False)
            assert torch.equal(generated[row, T:], alone[0, len(prompt):])


def _geometry(b: int, n: int, m: int, pads: tuple[int, ...] | None):
    """(q_pos, k_pos, key_valid) as the attention function derives them: left pads, consecutive positions."""
    if pads is None:
        q_pos = torch.arange(m - n, m).expand(b, n)
        key_valid = None
    else:
        mask = torch.ones(b, m, dtype=torch.long)
        for row, pad in enumerate(pads):
            mask[row, :pad] = 0
        q_pos = ((mask.cumsum(-1) - 1).clamp(min=0))[:, m - n:]
        key_valid = mask.bool()
    k_pos = q_pos[:, -1:] - (m - 1 - torch.arange(m))
    return q_pos, k_pos, key_valid


@pytest.mark.parametrize("section", [SELF_EXTEND, DUAL_CHUNK], ids=["self_extend", "dual_chunk"])
@pytest.mark.parametrize("n, m, pads", [(T, T, None), (T, T, (0, 11)), (1, T, None), (1, T, (3, 0)), (7, T, None),
                                        (70, 70, None)],
                         ids=["prefill", "prefill_padded", "decode", "decode_padded", "chunk", "prefill_70"])
def test_fused_kernel_path_equals_the_cpu_path(section, n, m, pads, monkeypatch):
    """The Triton kernel's path (CUDA's; the interpreter here) against the CPU paths, float32, GQA 4 / 2: one softmax
    over every key, blocks, and for a decode step each pass over its slice of the keys."""
    from hf_longctx.extend.config import ExtendSpec
    from hf_longctx.extend.rules import passes

    rules = passes(ExtendSpec(**section))
    gen = torch.Generator().manual_seed(n + m)
    b, d = 2, 32
    query = torch.randn(b, 4, n, d, generator=gen)
    key, value = (torch.randn(b, 2, m, d, generator=gen) for _ in range(2))
    q_pos, k_pos, key_valid = _geometry(b, n, m, pads)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    outputs = {}
    forms = ("fused", "single_pass", "blocks_of_7") + (("sliced_decode",) if n == 1 else ())
    for form in forms:
        with monkeypatch.context() as patch:
            patch.setattr(extend_attention, "FUSED", form == "fused")
            patch.setattr(extend_attention, "SLICED_DECODE", form == "sliced_decode")
            if form.startswith("blocks"):
                patch.setattr(extend_attention, "_SINGLE_PASS_ELEMENTS", 0)
                patch.setattr(extend_attention, "BAND_AND_LAG", False)
                patch.setattr(extend_attention, "BLOCK_SIZE", 7)
            outputs[form] = extend_attention.remapped_attention(query, key, value, q_pos, k_pos, key_valid, rules,
                                                                inv_freq, scaling=d ** -0.5)
    for form in forms[1:]:
        error = ((outputs["fused"] - outputs[form]).abs().max() / outputs[form].abs().max()).item()
        assert error <= 1e-5, f"fused vs {form}: {error:.2g}"
    if pads is not None:  # pad query rows own no key: zeros, as on the CPU path
        for form in forms[1:]:
            assert torch.equal(outputs["fused"] == 0, outputs[form] == 0), form


def test_fused_path_builds_no_score_matrix(monkeypatch):
    """Every kernel call of the fused path sees a slice of the keys with a mask the kernel computes itself."""
    from hf_longctx.extend.config import ExtendSpec
    from hf_longctx.extend.rules import passes

    monkeypatch.setattr(extend_attention, "FUSED", True)
    calls = []
    kernel = extend_attention._kernel_with_lse
    monkeypatch.setattr(extend_attention, "_kernel_with_lse",
                        lambda q, k, v, causal, window, scaling: calls.append((q.shape[2], k.shape[2], causal, window))
                        or kernel(q, k, v, causal, window, scaling))
    monkeypatch.setattr(torch, "matmul", None)  # no dense scores anywhere on this path
    n = 70
    q_pos, k_pos, _ = _geometry(1, n, n, None)
    x = torch.randn(1, 2, n, 16)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    extend_attention.remapped_attention(x, x, x, q_pos, k_pos, None, passes(ExtendSpec(**SELF_EXTEND)), inv_freq,
                                        scaling=0.25)
    window = SELF_EXTEND["window"]
    # neighbor pass: rows 0 .. W-1 see keys from 0 (causal), the others a window of W (keys 1 .. n-1)
    assert (window, window, True, None) in calls and (n - window, n - 1, True, window) in calls
    assert (n - window, n - window, True, None) in calls  # grouped pass: rows W .. n-1 over keys 0 .. n-W-1, causal
    assert len(calls) == 3


@pytest.mark.parametrize("section", [SELF_EXTEND, DUAL_CHUNK], ids=["self_extend", "dual_chunk"])
def test_decode_step_attends_each_key_once_without_a_score_matrix(section, monkeypatch):
    """A decode step off the kernel path: one flash call per pass over the pass's own slice of the keys (they tile
    the cache: every key read and re-rotated at most once), no GQA copy of the cache and no dense scores."""
    from hf_longctx.extend.config import ExtendSpec
    from hf_longctx.extend.rules import passes

    slices, rotated = [], []
    attend, rotate = extend_attention._attend_with_lse, extend_attention.rotate
    monkeypatch.setattr(extend_attention, "_attend_with_lse",
                        lambda q, k, v, bias, scaling: slices.append((k.shape[2], bias)) or attend(q, k, v, bias, scaling))
    monkeypatch.setattr(extend_attention, "rotate", lambda x, d, f: rotated.append(x.shape[2]) or rotate(x, d, f))
    monkeypatch.setattr(extend_attention, "_expand_heads", None)
    monkeypatch.setattr(torch, "matmul", None)
    m = 70
    q_pos, k_pos, _ = _geometry(1, 1, m, None)
    gen = torch.Generator().manual_seed(0)
    query, key, value = torch.randn(1, 4, 1, 16, generator=gen), *(torch.randn(1, 2, m, 16, generator=gen) for _ in "kv")
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    extend_attention.remapped_attention(query, key, value, q_pos, k_pos, None, passes(ExtendSpec(**section)), inv_freq,
                                        scaling=0.25)
    assert sum(n for n, _ in slices) == m and all(bias is None for _, bias in slices)
    assert len(slices) == (2 if section is SELF_EXTEND else 3)
    keys_rotated = [n for n in rotated if n > 1]  # the query (one row) is rotated per pass too
    assert sum(keys_rotated) == (m - SELF_EXTEND["window"] if section is SELF_EXTEND else m)


def test_unpatch_is_bit_identical():
    model = tiny_model("qwen3")
    ids = tokens(1, T)
    with torch.no_grad():
        before = model(ids).logits
        hf_longctx.patch(model, {"extend": SELF_EXTEND})
        assert not torch.equal(model(ids).logits, before)
        hf_longctx.unpatch(model)
        assert torch.equal(model(ids).logits, before)
    assert model.config._attn_implementation == "sdpa"


def test_partial_rotary_only_turns_the_rotary_dims():
    x = torch.randn(1, 2, 3, 10)
    inv_freq = torch.tensor([1.0, 0.1, 0.01])  # 6 rotary dims of 10
    delta = torch.tensor([[0, 5, -7]])
    turned = extend_attention.rotate(x, delta, inv_freq)
    assert torch.equal(turned[..., 6:], x[..., 6:])
    angle = delta[:, None, :, None].float() * inv_freq
    assert torch.allclose(turned[..., :6], _turn(x[..., :6], angle), atol=1e-6)


def test_gemma3_remaps_global_layers_only(forms):
    """Gemma 3: local layers keep their window and own rotary frequencies; with a window wider than the input
    the global layers are exact too, so the whole model equals the plain one."""
    model = tiny_model("gemma3_text", sliding_window=8, num_hidden_layers=2,
                       layer_types=["sliding_attention", "full_attention"])
    ids = tokens(1, T)
    with torch.no_grad():
        plain = model(ids).logits
        hf_longctx.patch(model, {"extend": {**SELF_EXTEND, "window": T}})
        assert close(model(ids).logits, plain)
        hf_longctx.unpatch(model)
        hf_longctx.patch(model, {"extend": SELF_EXTEND})
        assert not close(model(ids).logits, plain, 1e-3)


def test_gemma3_local_layers_run_the_windowed_kernel(monkeypatch):
    """Gemma 3's local layers under 'extend': a prefill over tokens 0..M-1 goes through the kernels' O(N·W) path
    with the native window (no [N, M] mask); a decode step over a sliding cache layer and a left-padded batch
    keep transformers' mask.
    Each equals the unpatched model (its own sdpa and window mask) on those layers' output."""
    from hf_longctx.extend import patch as extend_patch

    calls = []
    kernel = extend_patch.kernel_path

    def spy(*args, **kwargs):
        calls.append(kwargs["window"])
        return kernel(*args, **kwargs)

    monkeypatch.setattr(extend_patch, "kernel_path", spy)
    model = tiny_model("gemma3_text", sliding_window=8, num_hidden_layers=2,
                       layer_types=["sliding_attention", "full_attention"])
    ids = tokens(2, T)
    with torch.no_grad():
        plain = model(ids).logits
        plain_next = model(torch.cat([ids, ids[:, :1]], dim=1)).logits[:, -1]
        hf_longctx.patch(model, {"extend": {**SELF_EXTEND, "window": T + 1}})  # global layers exact as well
        calls.clear()  # the patch's own probe ran the model
        assert close(model(ids).logits, plain)
        assert calls == [8]  # the one local layer, with its native window
        cache = DynamicCache(config=model.config)
        model(ids, past_key_values=cache)
        step = model(ids[:, :1], past_key_values=cache).logits[:, -1]
        assert close(step, plain_next)
        assert calls == [8, 8]  # the prefill into the cache: the kernel; the decode step over the sliding
        # cache layer's last keys (they no longer start at token 0): transformers' mask
        calls.clear()
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        padded = model(ids, attention_mask=mask).logits
        assert calls == []  # padding: transformers' mask, not the kernel
        assert close(padded[0], plain[0])


@pytest.mark.parametrize("other, words", [
    ({"alibi": {}}, "ALiBi"),
    ({"streaming": {}}, "streaming"),
    ({"attention": {"sliding_window": 16}}, "attention function"),
    ({"rope": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
])
def test_refused_combinations(other, words):
    model = tiny_model("llama")
    with pytest.raises(SpecError, match=words):
        hf_longctx.patch(model, {"extend": SELF_EXTEND, **other})
    assert hf_longctx.applied_sections(model) == {}


def test_composes_with_a_fixed_rope_scaling():
    section = SELF_EXTEND
    model, reference = pair("llama", section)
    hf_longctx.unpatch(model)
    hf_longctx.patch(model, {"rope": {"type": "linear", "factor": 2.0}, "extend": section})
    hf_longctx.patch(reference, {"rope": {"type": "linear", "factor": 2.0}})
    reference.set_attn_implementation(reference_implementation(reference, section))  # the scaled frequencies
    ids = tokens(1, T)
    with torch.no_grad():
        assert close(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("model_type, words", [("gpt2", "rotary"), ("mistral", "native sliding window"),
                                              ("deepseek_v3", "latent attention"), ("glm", "half-split")])
def test_refused_models(model_type, words):
    with pytest.raises(SpecError, match=words):
        hf_longctx.patch(tiny_model(model_type), {"extend": SELF_EXTEND})


@pytest.mark.parametrize("section, key", [
    ({"method": "self_extend", "window": 4}, "group_size"),
    ({"method": "self_extend", "group_size": 2, "window": 0}, "window"),
    ({"method": "dual_chunk", "chunk_size": 8, "local_size": 8}, "local_size"),
    ({"method": "dual_chunk", "chunk_size": 8, "local_size": 2, "window": 3}, "window"),
])
def test_bad_sections(section, key):
    with pytest.raises(SpecError, match=f"extend.{key}"):
        hf_longctx.load_spec({"extend": section})


def test_dual_chunk_saves_qwen_config_and_loads_back(tmp_path):
    model = hf_longctx.patch(tiny_model("qwen2"), {"extend": DUAL_CHUNK})
    ids = tokens(1, T)
    with torch.no_grad():
        want = model(ids).logits
    hf_longctx.save_pretrained(model, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    trained = model.config.max_position_embeddings
    assert config["dual_chunk_attention_config"] == {"chunk_size": 12, "local_size": 4,
                                                     "original_max_position_embeddings": trained}
    loaded = hf_longctx.from_pretrained(tmp_path / "saved")
    assert hf_longctx.applied_sections(loaded) == {"extend": DUAL_CHUNK}
    # A checkpoint that only carries dual_chunk_attention_config (as Qwen2.5-1M's do) loads into the section.
    del config["hf_longctx"], config["hf_longctx_base"]
    (tmp_path / "saved" / "config.json").write_text(json.dumps(config))
    loaded = hf_longctx.from_pretrained(tmp_path / "saved")
    assert hf_longctx.applied_sections(loaded) == {"extend": DUAL_CHUNK}
    with torch.no_grad():
        assert close(loaded(ids).logits, want)


def test_presets_load():
    spec = hf_longctx.load_spec("self-extend-4x")
    assert spec.extend.method == "self_extend" and spec.extend.group_size == 4


def test_cli_eval_with_the_preset(capsys, tmp_path):
    """``hf-longctx eval --preset self-extend-4x``: inside the preset's window (1024) the plain model's scores;
    a spec with a small window changes them."""
    from hf_longctx import cli

    model_dir = tmp_path / "tiny"
    tiny_model("llama", seed=0, max_position_embeddings=512).save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text("".join("abcdefgh ij.\n"[(7 * i * i + 3 * i) % 13] for i in range(3000)))
    small = tmp_path / "small.yaml"
    small.write_text("extend:\n  method: self_extend\n  group_size: 8\n  window: 16\n")
    argv = ["eval", model_dir, "--preset", f"none,self-extend-4x,{small}", "--lengths", "600", "--tasks", "perplexity",
            "--data", text, "--windows", "1", "--out", tmp_path / "out",
            "--beyond-reach"]  # 600 tokens: past self-extend-4x's reach on a 512-position model, on purpose
    assert cli.main([str(a) for a in argv]) == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["perplexity"]
    assert [r["method"] for r in rows] == ["none", "self-extend-4x", str(small)]
    assert rows[1]["nll"] == pytest.approx(rows[0]["nll"], rel=1e-6)
    assert rows[2]["nll"] != pytest.approx(rows[0]["nll"], rel=2e-5)  # a random tiny model: small, but far above 1e-6
    assert "| self-extend-4x |" in capsys.readouterr().out


def test_real_demo_rows_of_the_extend_presets():
    """The ``--long`` rows on SmolLM2 (as tests/test_real_model.py gets it) at the quick lengths: inside the
    preset's window (1024) the plain model's perplexity, and the further length's columns."""
    import dataclasses

    from hf_longctx import loading, real_demo

    try:
        real_demo.smollm2_gguf()
    except OSError as err:
        pytest.skip(f"SmolLM2's GGUF cannot be had here ({err})")
    source = loading.resolve(real_demo.smollm2_converted())
    model = loading.load_model(source, dtype=torch.float32).eval()
    tokenizer = loading.load_tokenizer(source)
    text = real_demo.english_tokens(tokenizer)
    settings = dataclasses.replace(real_demo.QUICK, extend_methods=("self_extend",))
    rows = real_demo.rope_section(model, tokenizer, text, settings, methods=("self_extend",))
    plain = perplexity_vs_length(model, text, [100, 200], num_windows=1, score_tokens=settings.long_score_tokens)
    ppl = {r["length"]: r["perplexity"] for r in rows["perplexity"]}
    assert list(ppl) == [100, 200, 300]
    assert [ppl[100], ppl[200]] == pytest.approx([p.perplexity for p in plain], rel=1e-5)
    assert sorted({r["length"] for r in rows["passkey"]}) == [200, 300]
    table = real_demo._rope_table(rows, settings)
    assert "passkey 300" in table and "perplexity 300" in table
