"""streaming_nll (one forward) against the one-token-per-step loop through a SinkCache, and its refusals."""

import pytest
import torch

from hf_longctx import patch
from hf_longctx.evaluation import parallel_streaming_check, streaming_nll, streaming_perplexity
from hf_longctx.testing import tiny_model


def token_by_token(model, ids, sinks, window):
    return torch.tensor(streaming_perplexity(model, ids, sinks, window, progress=False).token_nll, dtype=torch.float64)


# llama: GQA; phi and gpt_neox: partial rotary (only part of each head is rotated); qwen2: biases
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi", "gpt_neox"])
@pytest.mark.parametrize("sinks, window", [(2, 10), (0, 12), (4, 7), (3, 1)])
def test_one_forward_equals_the_stream(model_type, sinks, window):
    model = tiny_model(model_type, seed=1)
    ids = torch.randint(0, model.config.vocab_size, (50,), generator=torch.Generator().manual_seed(2))
    expected = token_by_token(model, ids, sinks, window)
    got = streaming_nll(model, ids, sinks, window, block=8)  # blocks smaller than the stream and the window
    assert got.shape == (49,)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def test_the_sinks_are_seen_at_their_cache_positions():
    # Not rotating the queries back for the sinks (i.e. sinks at their true distance, as a sink mask over the
    # whole sequence would have them) gives other losses: the comparison above can tell the two apart.
    model = tiny_model("llama", seed=1)
    ids = torch.randint(0, model.config.vocab_size, (50,), generator=torch.Generator().manual_seed(2))
    streamed = streaming_nll(model, ids, 2, 10)
    masked = patch(tiny_model("llama", seed=1), {"attention": {"sliding_window": 10, "sink_tokens": 2, "backend": "sdpa"}})
    with torch.no_grad():
        logits = masked(ids[None]).logits[0, :-1]
    true_distance = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none").double()
    torch.testing.assert_close(streamed[:11], true_distance[:11], rtol=0, atol=2e-5)  # no eviction yet: the same
    assert (streamed[12:] - true_distance[12:]).abs().max() > 1e-3


def test_models_it_cannot_reproduce_are_refused():
    with pytest.raises(ValueError, match="native sliding window"):
        parallel_streaming_check(tiny_model("mistral", sliding_window=8))
    with pytest.raises(ValueError, match="changes its frequencies"):
        parallel_streaming_check(patch(tiny_model("llama"), {"rope": {"type": "dynamic", "factor": 2}}))
    with pytest.raises(ValueError, match="attention is patched"):
        streaming_nll(patch(tiny_model("llama"), {"attention": {"sliding_window": 8}}), torch.arange(20), 2, 8)
    with pytest.raises(ValueError, match="softcap"):  # gemma 2 passes its attention softcap
        streaming_nll(tiny_model("gemma2", sliding_window=64, layer_types=["full_attention"] * 2), torch.arange(20), 2, 8)
