"""Triton flash attention on a CUDA GPU: bf16/fp16 at realistic lengths, same oracle as on the CPU.

The error against the float64 dense reference is at most twice the error of plain PyTorch
in the same precision (plus 1e-6), for the output and every gradient. bf16 `tl.dot` is
wrong under the Triton interpreter, so bf16 is only checked here.
"""

import os

import pytest
import torch

from test_kernels import _assert_close_to_float64, _outputs_and_grads

from hf_longctx.kernels import flash_attention

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="Triton runs in its CPU interpreter"),
]

# name: (B, Hq, Hkv, N, M, D, options)
CASES = {
    "causal": (2, 4, 4, 1024, 1024, 64, {}),
    "gqa_window_sinks_alibi_sink_logits": (1, 8, 2, 1500, 1500, 128,
                                           dict(window=256, sink_tokens=4, alibi=True, sink_logits=True)),
    "noncausal": (1, 4, 2, 1024, 1300, 64, dict(causal=False)),
    "chunked_prefill_window": (1, 4, 1, 700, 2048, 128, dict(window=1000)),
    "packed_window": (1, 4, 2, 2048, 2048, 64, dict(cu_seqlens=[0, 300, 301, 1100, 2048], window=200,
                                                    sink_tokens=4, sink_logits=True)),
    "head_dim_96": (1, 4, 2, 1100, 1100, 96, dict(window=333)),
    # Gemma 2's cap of 50 barely bends these scores (std ~1); the smaller caps below bend them strongly.
    "gemma2_softcap_window_gqa": (1, 8, 4, 1500, 1500, 128, dict(window=512, softcap=50.0)),
    "softcap_gqa_window_sinks_alibi_sink_logits": (2, 4, 2, 1100, 1100, 64,
                                                   dict(window=300, sink_tokens=4, alibi=True, sink_logits=True,
                                                        softcap=2.0)),
    "softcap_decode_window_sinks": (2, 8, 2, 1, 2048, 128, dict(window=1024, sink_tokens=4, softcap=5.0)),
    "softcap_chunked_prefill_noncausal": (1, 4, 1, 700, 1500, 64, dict(causal=False, softcap=3.0)),
    "softcap_packed_window": (1, 4, 2, 2048, 2048, 64, dict(cu_seqlens=[0, 300, 301, 1100, 2048], window=200,
                                                             softcap=2.0)),
}


def _case(name):
    b, hq, hkv, n, m, d, opts = CASES[name]
    gen = torch.Generator(device="cuda").manual_seed(sum(map(ord, name)))
    q, k, v = (torch.randn(b, heads, length, d, generator=gen, device="cuda", dtype=torch.float64)
               for heads, length in ((hq, n), (hkv, m), (hkv, m)))
    do = torch.randn(b, hq, n, d, generator=gen, device="cuda", dtype=torch.float64)
    sink = torch.randn(hq, generator=gen, device="cuda", dtype=torch.float64) if opts.get("sink_logits") else None
    options = {key: val for key, val in opts.items() if key not in ("alibi", "sink_logits")}
    if opts.get("alibi"):
        options["alibi_slopes"] = torch.rand(hq, generator=gen, device="cuda") * 0.1
    if "cu_seqlens" in options:
        options["cu_seqlens"] = torch.tensor(options["cu_seqlens"], dtype=torch.int32, device="cuda")
    return (q, k, v, sink), do, options


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_float64_reference(case, dtype):
    _assert_close_to_float64(*_case(case), lambda *a, **kw: flash_attention(*a, backend="triton", **kw), dtype)


def test_auto_backend_on_cuda_is_triton():
    inputs, _, options = _case("causal")
    q, k, v = (t.to(torch.bfloat16) for t in inputs[:3])
    torch.testing.assert_close(flash_attention(q, k, v, **options), flash_attention(q, k, v, backend="triton",
                                                                                      **options), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["gqa_window_sinks_alibi_sink_logits", "softcap_gqa_window_sinks_alibi_sink_logits"])
def test_backward_is_deterministic_with_gqa(case):
    inputs, do, options = _case(case)
    fn = lambda *a, **kw: flash_attention(*a, backend="triton", **kw)  # noqa: E731
    first = _outputs_and_grads(fn, inputs, do, options, torch.bfloat16)
    second = _outputs_and_grads(fn, inputs, do, options, torch.bfloat16)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
