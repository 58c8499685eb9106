"""Flash attention kernels on the CPU: the Triton kernel under the interpreter and the blocked path.

Oracle: against the float64 dense reference, the error of each backend is at most twice the
error of plain PyTorch in the same precision (the reference run in fp16/fp32), plus 1e-6,
for the output and every gradient (dq, dk, dv, d sink_logits). The reference's softcap is
checked against transformers' Gemma 2 eager attention.
"""

import os
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl
from transformers.masking_utils import causal_mask_function, eager_mask, sliding_window_causal_mask_function
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager_attention

from hf_longctx.kernels import blocked
from hf_longctx.kernels.blocked import blocked_attention
from hf_longctx.kernels.flash_attention import _tanh, flash_attention, key_block_ranges, query_block_ranges
from hf_longctx.kernels.reference import check_inputs, flash_attention_reference, visible

# name: (B, Hq, Hkv, N, M, D, options). Shapes are small and odd (N not a multiple of the
# 32-row interpreter blocks); windows span several blocks.
CASES = {
    "causal": (2, 2, 2, 77, 77, 64, {}),
    "noncausal_cross_mqa": (1, 2, 1, 45, 70, 32, dict(causal=False)),
    "gqa_window_sinks_alibi_sink_logits": (2, 4, 2, 100, 100, 32,
                                           dict(window=33, sink_tokens=4, alibi=True, sink_logits=True)),
    "window": (1, 2, 2, 90, 90, 64, dict(window=40)),
    "decode_window_sinks": (2, 4, 1, 1, 90, 32, dict(window=40, sink_tokens=2)),
    "chunked_prefill_window_alibi": (1, 2, 2, 37, 100, 64, dict(window=50, alibi=True)),
    "chunked_prefill_causal_sink_logits": (1, 4, 2, 40, 75, 32, dict(sink_logits=True)),
    "packed_window_sinks": (1, 4, 2, 100, 100, 32,
                            dict(cu_seqlens=[0, 30, 31, 77, 100], window=20, sink_tokens=2, sink_logits=True)),
    "packed_position_ids_alibi": (1, 2, 1, 90, 90, 32, dict(position_ids=[0, 45, 46, 90], alibi=True)),
    "head_dim_96": (1, 2, 1, 50, 50, 96, dict(window=30)),
    # Softcaps near the scores' spread (std ~1), so tanh is far from linear.
    "softcap_gqa_window_sinks": (2, 4, 2, 70, 70, 32, dict(window=25, sink_tokens=3, softcap=2.0)),
    "softcap_causal_alibi": (1, 2, 2, 50, 50, 64, dict(alibi=True, softcap=1.5)),
    "softcap_mqa_sink_logits": (1, 4, 1, 45, 45, 32, dict(sink_logits=True, softcap=3.0)),
    "softcap_noncausal_cross": (1, 2, 1, 30, 50, 32, dict(causal=False, softcap=1.0)),
    "softcap_decode_window_sinks_sink_logits": (2, 4, 2, 1, 70, 32,
                                                dict(window=30, sink_tokens=2, sink_logits=True, softcap=2.0)),
    "softcap_chunked_prefill_window_alibi": (1, 2, 1, 37, 80, 64, dict(window=40, alibi=True, softcap=2.5)),
    "softcap_packed_window_sinks": (1, 2, 1, 60, 60, 32,
                                    dict(cu_seqlens=[0, 25, 26, 60], window=15, sink_tokens=2, softcap=2.0)),
}
# Blocked path only: windows short enough that most 32-row blocks run in the batched band
# form, for every feature it supports (batch > 1 and sinks copy the bands).
BAND_CASES = {
    "band_gqa_sinks_sink_logits": (2, 4, 2, 150, 150, 32, dict(window=33, sink_tokens=3, sink_logits=True)),
    "band_mqa_alibi": (2, 4, 1, 130, 130, 64, dict(window=40, alibi=True)),
    "band_chunked_prefill_sinks": (1, 4, 2, 70, 160, 32, dict(window=48, sink_tokens=4)),
    "band_packed_window_alibi_sink_logits": (1, 2, 1, 200, 200, 32,
                                             dict(cu_seqlens=[0, 120, 200], window=25, alibi=True, sink_logits=True)),
    "band_alibi_sinks_falls_back": (1, 2, 2, 120, 120, 32, dict(window=30, sink_tokens=2, alibi=True)),
    "band_softcap_gqa_sinks": (2, 4, 2, 130, 130, 32, dict(window=33, sink_tokens=3, softcap=2.0)),
    "band_softcap_alibi_sink_logits": (1, 2, 1, 150, 150, 32, dict(window=40, alibi=True, sink_logits=True,
                                                                   softcap=3.0)),
}


def _blocked(q, k, v, *, causal=True, window=None, sink_tokens=0, alibi_slopes=None, sink_logits=None,
             softcap=None, cu_seqlens=None, position_ids=None, scale=None):
    """The blocked CPU path with 32-row blocks, so these small shapes cross block edges."""
    options = dict(causal=causal, window=window, sink_tokens=sink_tokens, alibi_slopes=alibi_slopes,
                   sink_logits=sink_logits, softcap=softcap)
    cu_seqlens, scale = check_inputs(q, k, v, cu_seqlens=cu_seqlens, position_ids=position_ids, scale=scale,
                                     **options)
    return blocked_attention(q, k, v, cu_seqlens=cu_seqlens, scale=scale, block_size=32, **options)


def _triton(q, k, v, **options):
    return flash_attention(q, k, v, backend="triton", **options)


# conftest.py sets TRITON_INTERPRET=1 before triton is imported when there is no GPU; on a GPU
# machine Triton compiles for the device instead, and tests/test_kernels_gpu.py covers the kernel.
_TRITON_ON_CPU = pytest.param(
    _triton,
    marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton compiles for the GPU here"),
    id="triton",
)


def _make_case(name):
    b, hq, hkv, n, m, d, opts = {**CASES, **BAND_CASES}[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    # Inputs in transformers' layout: [B, N, H, D] memory viewed as [B, H, N, D].
    q = torch.randn(b, n, hq, d, generator=gen, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(b, m, hkv, d, generator=gen, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(b, m, hkv, d, generator=gen, dtype=torch.float64).transpose(1, 2)
    do = torch.randn(b, hq, n, d, generator=gen, dtype=torch.float64)
    sink = torch.randn(hq, generator=gen, dtype=torch.float64) if opts.get("sink_logits") else None
    options = {key: val for key, val in opts.items() if key not in ("alibi", "sink_logits")}
    if opts.get("alibi"):
        options["alibi_slopes"] = torch.rand(hq, generator=gen) * 0.5
    if "cu_seqlens" in options:
        options["cu_seqlens"] = torch.tensor(options["cu_seqlens"], dtype=torch.int32)
    if "position_ids" in options:
        bounds = options["position_ids"]
        options["position_ids"] = torch.cat([torch.arange(e - s) for s, e in zip(bounds, bounds[1:])])[None]
    return (q, k, v, sink), do, options


def _outputs_and_grads(fn, inputs, do, options, dtype):
    """fn's output and gradients for q, k, v (and sink_logits), from inputs cast to dtype."""
    q, k, v, sink = inputs
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    if sink is not None:
        leaves.append(sink.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_())
    out = fn(*leaves[:3], sink_logits=leaves[3] if sink is not None else None, **options)
    assert out.dtype == dtype and out.shape == do.shape
    return [out, *torch.autograd.grad(out, leaves, do.to(dtype))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", [_TRITON_ON_CPU, pytest.param(_blocked, id="blocked")])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, backend, dtype):
    _assert_matches_float64_reference(case, backend, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(BAND_CASES))
def test_blocked_band_path_matches_float64_reference(case, dtype):
    _assert_matches_float64_reference(case, _blocked, dtype)


def _assert_matches_float64_reference(case, backend, dtype):
    _assert_close_to_float64(*_make_case(case), backend, dtype)


def _assert_close_to_float64(inputs, do, options, backend, dtype):
    """The output and every gradient of ``backend`` in ``dtype`` are within twice plain PyTorch's
    error (the reference run in ``dtype``) of the float64 reference, plus 1e-6."""
    exact = _outputs_and_grads(flash_attention_reference, inputs, do, options, torch.float64)
    plain = _outputs_and_grads(flash_attention_reference, inputs, do, options, dtype)
    ours = _outputs_and_grads(backend, inputs, do, options, dtype)
    for name, e, p, o in zip(["out", "dq", "dk", "dv", "d_sink_logits"], exact, plain, ours):
        err_plain = (p.double() - e).abs().max().item()
        err_ours = (o.double() - e).abs().max().item()
        assert err_ours <= 2 * err_plain + 1e-6, f"{name}: error {err_ours:.3g} vs plain PyTorch {err_plain:.3g}"


def test_auto_backend_on_cpu_is_blocked_path():
    (q, k, v, _), _, options = _make_case("gqa_window_sinks_alibi_sink_logits")
    q, k, v = q.float(), k.float(), v.float()
    expected = _blocked(q, k, v, **options)
    torch.testing.assert_close(flash_attention(q, k, v, **options), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flash_attention(q, k, v, backend="reference", **options), expected,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("split", ["every_block_alone", "one_block_per_call"])
@pytest.mark.parametrize("case", list(BAND_CASES))
def test_blocked_band_path_agrees_with_per_block_path(case, split, monkeypatch):
    inputs, do, options = _make_case(case)
    band = _outputs_and_grads(_blocked, inputs, do, options, torch.float32)
    if split == "every_block_alone":
        monkeypatch.setattr(blocked, "_band_start", lambda n, m, **_: None)
    else:
        monkeypatch.setattr(blocked, "_CALL_ELEMENTS", 1)
    per_block = _outputs_and_grads(_blocked, inputs, do, options, torch.float32)
    for name, a, b in zip(["out", "dq", "dk", "dv", "d_sink_logits"], band, per_block):
        torch.testing.assert_close(a, b, msg=lambda text: f"{name}: {text}")


@pytest.mark.parametrize("sink_tokens", [0, 4])
def test_sliding_window_runs_as_two_calls(sink_tokens, monkeypatch):
    """Whatever N: one call for the rows before the band, one batched call for all blocks of the band."""
    calls = []
    monkeypatch.setattr(blocked, "_attend_rows", lambda q, *args, **kwargs: calls.append(q.shape) or q)
    window, block = 64, 32
    for n in (1000, 4000):
        calls.clear()
        q, k, v = _qkv(n=n, m=n)
        assert _blocked(q, k, v, window=window, sink_tokens=sink_tokens).shape == q.shape
        assert len(calls) == 2, calls
        band_blocks, _, rows, _ = calls[1]
        assert rows == block and band_blocks * block >= n - (window + sink_tokens + 2 * block)


@pytest.mark.parametrize("scores_options", [dict(sink_logits=torch.zeros(4)), dict(softcap=2.0)],
                         ids=["sink_logits", "softcap"])
@pytest.mark.parametrize("window", [100, 1000])
def test_blocked_calls_stay_under_the_element_limit(window, scores_options, monkeypatch):
    """With sink logits or a softcap the scores `[B, Hq, rows, keys]` are materialised: each call keeps them under
    the limit (or to one block), however large the window."""
    limit, block = 1 << 16, 32
    monkeypatch.setattr(blocked, "_CALL_ELEMENTS", limit)
    calls = []
    monkeypatch.setattr(blocked, "_attend_rows", lambda q, k, *args, **kwargs: calls.append((q.shape, k.shape)) or q)
    q, k, v = _qkv(b=2, hq=4, hkv=2, n=1000, m=1000)
    _blocked(q, k, v, window=window, sink_tokens=2, **scores_options)
    assert sum(q_shape[0] * q_shape[2] for q_shape, _ in calls) == 2 * 1000  # [B or B·blocks, Hq, rows, D]
    for (x, hq, rows, _), (_, _, keys, _) in calls:
        assert x * hq * rows * keys <= max(limit, 2 * hq * block * keys), (x, rows, keys)  # B = 2


TABLE_CASES = [  # (q_lens, k_lens, block_m, block_n, causal, window, sink_tokens)
    ([77], [77], 16, 16, True, None, 0),
    ([45], [70], 16, 32, False, None, 0),
    ([100], [100], 16, 16, True, 33, 4),
    ([37], [100], 32, 16, True, 50, 20),
    ([1], [90], 16, 16, True, 40, 2),
    ([30, 1, 46, 23], [30, 1, 46, 23], 16, 8, True, 20, 9),
    ([64], [64], 16, 16, True, 1, 0),
]


@pytest.mark.parametrize("q_lens,k_lens,block_m,block_n,causal,window,sink_tokens", TABLE_CASES)
def test_block_tables_visit_exactly_the_blocks_with_visible_pairs(q_lens, k_lens, block_m, block_n, causal, window,
                                                                  sink_tokens):
    mask_options = dict(causal=causal, window=window, sink_tokens=sink_tokens)
    kv_table = key_block_ranges(q_lens, k_lens, block_m, block_n, **mask_options)
    q_table = query_block_ranges(q_lens, k_lens, block_m, block_n, **mask_options)
    for seq, (n, m) in enumerate(zip(q_lens, k_lens)):
        mask = visible(torch.arange(m - n, m), torch.arange(m), **mask_options)
        qb, kb = -(-n // block_m), -(-m // block_n)
        padded = torch.zeros(qb * block_m, kb * block_n, dtype=torch.bool)
        padded[:n, :m] = mask
        needed = padded.view(qb, block_m, kb, block_n).any(dim=(1, 3))
        from_kv_table = torch.zeros_like(needed)
        for i, (sink_end, lo, hi) in enumerate(kv_table[seq, :qb].tolist()):
            assert sink_end <= lo, "sink and window ranges must not overlap"
            from_kv_table[i, :sink_end] = True
            from_kv_table[i, lo:hi] = True
        from_q_table = torch.zeros_like(needed)
        for j, (lo, hi) in enumerate(q_table[seq, :kb].tolist()):
            from_q_table[lo:hi, j] = True
        assert torch.equal(from_kv_table, needed)
        assert torch.equal(from_q_table, needed)


def test_sliding_window_visits_o_of_window_key_blocks():
    n, window, sink_tokens, block_m, block_n = 16384, 1024, 4, 128, 64
    table = key_block_ranges([n], [n], block_m, block_n, causal=True, window=window, sink_tokens=sink_tokens)[0]
    per_block = table[:, 0] + table[:, 2] - table[:, 1]
    assert per_block.max().item() <= -(-(window + block_m - 1) // block_n) + 1 + 1  # window span + one sink block
    causal_total = sum(-(-min(n, (i + 1) * block_m) // block_n) for i in range(n // block_m))
    assert per_block.sum().item() * 5 < causal_total  # vs ~N/(2W) blocks per query block without a window
    q_table = query_block_ranges([n], [n], block_m, block_n, causal=True, window=window, sink_tokens=sink_tokens)[0]
    assert (q_table[1:, 1] - q_table[1:, 0]).max().item() <= -(-(window + block_n - 1) // block_m) + 1
    assert (q_table[0, 1] - q_table[0, 0]).item() == n // block_m  # the sink block is seen by every query


def _qkv(b=1, hq=4, hkv=2, n=8, m=8, d=32):
    return torch.randn(b, hq, n, d), torch.randn(b, hkv, m, d), torch.randn(b, hkv, m, d)


@pytest.mark.parametrize("backend", ["triton", "blocked", "reference"])
@pytest.mark.parametrize("make,options,message", [
    (lambda: _qkv(hq=3, hkv=2), {}, "multiple of the number of key/value heads"),
    (lambda: _qkv(b=2), dict(cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32)), "B == 1"),
    (lambda: _qkv(), dict(cu_seqlens=torch.tensor([0, 5, 4, 8], dtype=torch.int32)), "without decreasing"),
    (lambda: _qkv(), dict(alibi_slopes=torch.ones(2)), r"alibi_slopes must have shape \[Hq\] = \[4\]"),
    (lambda: _qkv(), dict(sink_logits=torch.ones(4, 1)), r"sink_logits must have shape \[Hq\]"),
    (lambda: _qkv(), dict(causal=False, window=4), "needs causal=True"),
    (lambda: _qkv(), dict(window=0), "window must be an int >= 1"),
    (lambda: _qkv(n=9), {}, "more queries"),
    (lambda: _qkv(), dict(position_ids=torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])), "must start at 0"),
    (lambda: _qkv(), dict(position_ids=torch.tensor([[0, 1, 2, 4, 0, 1, 2, 3]])), "count up by one"),
    (lambda: _qkv(), dict(softcap=0.0), "softcap must be a finite number > 0"),
    (lambda: _qkv(), dict(softcap=float("inf")), "softcap must be a finite number > 0"),
], ids=["gqa_ratio", "packed_batch", "cu_seqlens_order", "alibi_shape", "sink_shape", "window_noncausal",
        "window_zero", "n_gt_m_causal", "position_ids_start", "position_ids_gap", "softcap_zero", "softcap_inf"])
def test_bad_inputs_raise_clear_errors(backend, make, options, message):
    q, k, v = make()
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, backend=backend, **options)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        flash_attention(*_qkv(), backend="cuda")


def test_position_ids_give_the_same_documents_as_cu_seqlens():
    q, k, v = _qkv(n=10, m=10)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]])
    cu_seqlens, _ = check_inputs(q, k, v, causal=True, window=None, sink_tokens=0, alibi_slopes=None,
                                 sink_logits=None, softcap=None, cu_seqlens=None, position_ids=position_ids,
                                 scale=None)
    assert cu_seqlens.tolist() == [0, 3, 5, 10] and cu_seqlens.dtype == torch.int32


# name: (B, Hq, Hkv, N, M, window, alibi): Gemma 2's sliding and global layers, prefill and chunked prefill.
GEMMA2_CASES = {
    "sliding_gqa": (2, 4, 2, 40, 40, 16, False),
    "global_chunked_prefill": (1, 4, 1, 9, 30, None, False),
    "sliding_chunked_prefill_alibi": (1, 2, 2, 12, 35, 10, True),
}


@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("case", list(GEMMA2_CASES))
def test_softcap_matches_gemma2_eager_attention(case, backend):
    """Same q/k/v through transformers' Gemma 2 eager attention: scale, cap, then mask (+ ALiBi bias) and softmax.

    ALiBi enters Gemma 2's function as part of the additive mask, which it adds after the cap: the
    order flash_attention documents. Gemma 2 takes the softmax in fp32, hence the tolerance on fp64 inputs.
    """
    b, hq, hkv, n, m, window, alibi = GEMMA2_CASES[case]
    d, softcap, scaling = 32, 2.0, 24 ** -0.5  # Gemma 2 scales by query_pre_attn_scalar ** -0.5, not head_dim
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    q = torch.randn(b, hq, n, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, m, d, generator=gen, dtype=torch.float64) for _ in range(2))
    mask_function = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    mask = eager_mask(batch_size=b, q_length=n, kv_length=m, q_offset=m - n, mask_function=mask_function,
                      dtype=torch.float64)
    slopes = torch.rand(hq, generator=gen, dtype=torch.float64) * 0.5 if alibi else None
    if alibi:
        distance = (torch.arange(m - n, m)[:, None] - torch.arange(m)[None, :]).abs()
        mask = mask - slopes[:, None, None] * distance
    module = SimpleNamespace(head_dim=d, num_key_value_groups=hq // hkv, training=False)
    expected, _ = gemma2_eager_attention(module, q, k, v, mask, scaling=scaling, softcap=softcap)
    options = dict(window=window, alibi_slopes=slopes, scale=scaling)
    ours = flash_attention(q, k, v, softcap=softcap, backend=backend, **options).transpose(1, 2)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    uncapped = flash_attention(q, k, v, backend=backend, **options).transpose(1, 2)
    assert (uncapped - expected).abs().max() > 1e-2  # the cap is active at these scores


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton compiles for the GPU here")
def test_triton_tanh_within_two_ulp():
    """The kernels' tanh (core ops only) against float64: relative error at most 2 fp32 ulp, exactly odd, |t| <= 1."""
    @triton.jit
    def tanh_kernel(X, Y, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, _tanh(tl.load(X + offs, mask=offs < N)), mask=offs < N)

    magnitudes = torch.cat([torch.linspace(0, 12, 8001), torch.logspace(-8, 1, 2000), torch.tensor([0.625])])
    x = torch.cat([magnitudes, -magnitudes])
    t = torch.empty_like(x)
    tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, t, x.numel(), BLOCK=1024)
    exact = torch.tanh(x.double())
    relative = (t.double() - exact).abs() / exact.abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert relative.max().item() <= 2 * torch.finfo(torch.float32).eps
    assert torch.equal(t[: magnitudes.numel()], -t[magnitudes.numel():])
    assert t.abs().max().item() == 1.0
