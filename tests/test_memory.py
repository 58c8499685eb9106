"""RecurrentMemoryModel (``memory``): identity, segment semantics, truncated BPTT, the cache, generate, save, LoRA, learning."""

from __future__ import annotations

import pytest
import torch
from conftest import tokens
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

import hf_longctx
from hf_longctx import compat
from hf_longctx import RecurrentMemoryModel, SpecError
from hf_longctx.hub import EXTRA_WEIGHTS
from hf_longctx.memory import RecurrentMemoryCache
from hf_longctx.memory.task import PasskeyTask, evaluate_memory_task, train_memory_task
from hf_longctx.testing import tiny_model

FAMILIES = ["llama", "qwen2", "gpt_neox"]


def _memory(model, memory_tokens=3, segment_length=5, bptt_depth=None):
    spec = {"memory": {"memory_tokens": memory_tokens, "segment_length": segment_length, "bptt_depth": bptt_depth}}
    wrapper = hf_longctx.patch(model, spec)
    with torch.no_grad():  # a memory far from the embedding scale, so that a lost memory shows
        wrapper.memory.normal_(0.0, 1.0)
    return wrapper


@pytest.mark.parametrize("model_type", FAMILIES)
def test_no_memory_one_segment_is_the_base_model(model_type):
    base = tiny_model(model_type)
    ids = tokens(2, 12, seed=0)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding: positions of the real tokens are unchanged
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        wrapper = hf_longctx.patch(base, {"memory": {"memory_tokens": 0, "segment_length": 12}})
        out = wrapper(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    assert isinstance(wrapper, RecurrentMemoryModel)
    assert out.logits.shape == ref.logits.shape
    real = mask.bool()  # padding never enters a segment: its logits and hidden states are zeros
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=1e-5, rtol=0)
    assert not out.logits[~real].any()
    assert len(out.hidden_states) == len(ref.hidden_states)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
        assert not ours[~real].any()
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert hf_longctx.unpatch(wrapper) is base
    assert not hasattr(base.config, "hf_longctx")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_segments_match_the_base_model_run_by_hand(model_type):
    """Oracle: the base model called once per segment on [memory | tokens | memory] as inputs_embeds."""
    base = tiny_model(model_type)
    wrapper = _memory(base, memory_tokens=3, segment_length=5)
    ids = tokens(2, 13, seed=1)
    with torch.no_grad():
        out = wrapper(input_ids=ids, labels=ids)
        memory = wrapper.memory[None].expand(2, -1, -1)
        logits = []
        for start in range(0, 13, 5):
            embeds = base.get_input_embeddings()(ids[:, start : start + 5])
            run = base(inputs_embeds=torch.cat([memory, embeds, memory], 1), output_hidden_states=True)
            logits.append(run.logits[:, 3 : 3 + embeds.shape[1]])
            memory = run.hidden_states[-1][:, 3 + embeds.shape[1] :]
        logits = torch.cat(logits, 1)
        ref_loss = base.loss_function(logits=logits, labels=ids, vocab_size=base.config.vocab_size)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.memory, memory, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=0)


def test_padding_takes_no_position_and_an_all_padding_segment_keeps_the_memory():
    wrapper = _memory(tiny_model("llama"), memory_tokens=2, segment_length=4)
    ids = tokens(1, 10, seed=2)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)  # one whole segment of left padding
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.no_grad():
        plain = wrapper(input_ids=ids)
        left = wrapper(input_ids=padded, attention_mask=mask)
    torch.testing.assert_close(left.logits[:, 4:], plain.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(left.memory, plain.memory, atol=1e-5, rtol=0)


def _embedding_rows_reached(bptt_depth, loss_segment, segments=4, length=4):
    """Segments whose tokens' embedding rows get a gradient; every segment has its own token ids."""
    base = tiny_model("llama")  # untied embeddings: the LM head does not touch the input rows
    wrapper = _memory(base, memory_tokens=2, segment_length=length, bptt_depth=bptt_depth)
    ids = torch.stack([torch.arange(10 + 10 * s, 10 + 10 * s + length) for s in range(segments)]).reshape(1, -1)
    labels = torch.full_like(ids, -100)
    # Logit i is scored against labels[i + 1]: this scores only the logits of `loss_segment`.
    labels[0, loss_segment * length + 1 : (loss_segment + 1) * length + 1] = ids[0, loss_segment * length + 1 : (loss_segment + 1) * length + 1]
    wrapper(input_ids=ids, labels=labels).loss.backward()
    grad = base.get_input_embeddings().weight.grad
    rows = [grad[10 + 10 * s : 10 + 10 * s + length].abs().sum().item() for s in range(segments)]
    return [s for s, g in enumerate(rows) if g > 0], wrapper.memory.grad


@pytest.mark.parametrize("bptt_depth, reached", [(None, [0, 1, 2, 3]), (1, [3]), (2, [2, 3]), (3, [1, 2, 3])])
def test_gradient_reaches_bptt_depth_segments(bptt_depth, reached):
    assert not tiny_model("llama").config.tie_word_embeddings
    got, memory_grad = _embedding_rows_reached(bptt_depth, loss_segment=3)
    assert got == reached
    # The learned memory is read by segment 0: it trains only when segment 0 is in reach.
    assert (memory_grad is not None and memory_grad.abs().sum() > 0) == (0 in reached)


def test_truncation_counts_back_from_the_last_segment_with_a_loss():
    got, _ = _embedding_rows_reached(2, loss_segment=1)
    assert got == [0, 1]


def test_cached_forward_in_pieces_equals_the_whole_forward():
    """Tokens fed to a RecurrentMemoryCache in uneven pieces across 3 segment boundaries give the logits and
    hidden states of one forward pass over all of them; the cache counts every token, padding included."""
    wrapper = _memory(tiny_model("llama"), memory_tokens=3, segment_length=5)
    ids, mask = _left_padded(length=17, pad=7)  # row 0: the first segment is all padding
    with torch.no_grad():
        whole = wrapper(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        cache, logits, hidden = RecurrentMemoryCache(), [], []
        for start, end in [(0, 4), (4, 5), (5, 12), (12, 13), (13, 17)]:
            out = wrapper(input_ids=ids[:, start:end], attention_mask=mask[:, :end], output_hidden_states=True,
                          **{compat.CACHE: cache})
            assert compat.cache_of(out) is cache and cache.get_seq_length() == end
            logits.append(out.logits)
            hidden.append(out.hidden_states)
    torch.testing.assert_close(torch.cat(logits, 1), whole.logits, atol=1e-5, rtol=0)
    for layer, pieces in zip(whole.hidden_states, zip(*hidden)):
        torch.testing.assert_close(torch.cat(pieces, 1), layer, atol=1e-5, rtol=0)
    assert len(whole.hidden_states) == wrapper.config.num_hidden_layers + 1


@pytest.mark.parametrize("model_type", FAMILIES)
def test_generate_across_segment_boundaries_matches_forward(model_type):
    """Cached generation over 4 segment boundaries equals re-running forward by hand on the whole sequence."""
    wrapper = _memory(tiny_model(model_type), memory_tokens=3, segment_length=5)
    ids = tokens(2, 7, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    generated = wrapper.generate(ids, attention_mask=mask, max_new_tokens=14, eos_token_id=None)
    assert generated.shape == (2, 21)
    sequence = ids
    with torch.no_grad():
        for _ in range(14):
            step_mask = torch.cat([mask, torch.ones(2, sequence.shape[1] - 7, dtype=torch.long)], 1)
            token = wrapper(input_ids=sequence, attention_mask=step_mask).logits[:, -1].argmax(-1)
            sequence = torch.cat([sequence, token[:, None]], 1)
    assert torch.equal(generated, sequence)


MODES = {"greedy": {}, "sample": dict(do_sample=True, temperature=0.8, top_k=20), "beams": dict(num_beams=2)}


def _left_padded(length=10, pad=3, seed=3):
    """Two prompts ``[2, length]``; the first left-padded with ``pad`` pad tokens (id 0)."""
    ids = tokens(2, length, seed=seed)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _generate(model, ids, seed=0, **kwargs):
    torch.manual_seed(seed)
    return model.generate(ids, **kwargs)


@pytest.mark.parametrize("model_type, mode", [(family, "greedy") for family in FAMILIES] + [("llama", "sample"), ("llama", "beams")])
def test_generate_with_the_cache_equals_full_recompute(model_type, mode):
    """The cache against use_cache=False (forward on the whole sequence at every step): segments of 8, a
    prompt of 10 with 3 pads in row 0, 24 new tokens: boundaries at 8 (in the prompt), 16, 24 and 32."""
    wrapper = _memory(tiny_model(model_type), memory_tokens=3, segment_length=8)
    ids, mask = _left_padded()
    options = dict(attention_mask=mask, max_new_tokens=24, eos_token_id=None, **MODES[mode])
    cached = _generate(wrapper, ids, **options)
    assert cached.shape == (2, 34)
    assert torch.equal(cached, _generate(wrapper, ids, use_cache=False, **options))


@pytest.mark.parametrize("mode", MODES)
def test_generate_without_memory_in_one_segment_is_transformers_generate(mode):
    base = tiny_model("llama")
    ids, mask = _left_padded(length=6, pad=2, seed=4)
    options = dict(attention_mask=mask, max_new_tokens=10, **MODES[mode])
    expected = _generate(base, ids, **options)
    wrapper = hf_longctx.patch(base, {"memory": {"memory_tokens": 0, "segment_length": 32}})
    assert torch.equal(_generate(wrapper, ids, **options), expected)


def test_beam_search_reorders_the_memory_with_the_beams():
    """With the cache's reordering disabled the beams read each other's memory and the tokens change."""
    wrapper = _memory(tiny_model("llama"), memory_tokens=3, segment_length=4)
    ids, mask = _left_padded(length=6, pad=2, seed=9)
    options = dict(attention_mask=mask, max_new_tokens=16, eos_token_id=None, num_beams=3, num_return_sequences=3)
    recomputed = wrapper.generate(ids, use_cache=False, **options)
    assert torch.equal(wrapper.generate(ids, **options), recomputed)
    original = RecurrentMemoryCache.reorder_cache
    try:
        RecurrentMemoryCache.reorder_cache = lambda self, beam_idx: None
        assert not torch.equal(wrapper.generate(ids, **options), recomputed)
    finally:
        RecurrentMemoryCache.reorder_cache = original


def _first_new_token(free, prompt_length, at):
    """A token that the free run ``free`` ``[1, T]`` generates first at new position ``at``."""
    token = free[0, prompt_length + at].item()
    assert token not in free[0, prompt_length : prompt_length + at].tolist(), "pick another position"
    return token


def test_eos_min_new_tokens_max_length_and_stopping_criteria():
    wrapper = _memory(tiny_model("llama"), memory_tokens=2, segment_length=4)
    ids = tokens(1, 5, seed=5)
    free = wrapper.generate(ids, max_new_tokens=12, eos_token_id=None)
    eos = _first_new_token(free, 5, at=2)
    stopped = wrapper.generate(ids, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(stopped, free[:, :8])  # ends with the EOS
    held = wrapper.generate(ids, max_new_tokens=12, min_new_tokens=7, eos_token_id=eos, pad_token_id=0)
    assert held.shape[1] >= 12 and eos not in held[0, 5:12].tolist()
    assert torch.equal(held, wrapper.generate(ids, max_new_tokens=12, min_new_tokens=7, eos_token_id=eos, pad_token_id=0, use_cache=False))

    assert wrapper.generate(ids, max_length=14, eos_token_id=None).shape == (1, 14)

    stop_token = _first_new_token(free, 5, at=6)

    class StopAt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == stop_token

    out = wrapper.generate(ids, max_new_tokens=12, eos_token_id=None, stopping_criteria=StoppingCriteriaList([StopAt()]))
    assert torch.equal(out, free[:, :12])


def test_logits_processor_applies_at_every_step():
    wrapper = _memory(tiny_model("llama"), memory_tokens=2, segment_length=4)
    ids, mask = _left_padded(length=5, pad=2, seed=6)
    free = wrapper.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    banned = free[0, 5].item()
    seen_lengths = []

    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen_lengths.append(input_ids.shape[1])
            return scores.index_fill(1, torch.tensor([banned]), -float("inf"))

    options = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=None, logits_processor=LogitsProcessorList([Ban()]))
    out = wrapper.generate(ids, **options)
    assert seen_lengths == list(range(5, 17))
    assert banned not in out[:, 5:].tolist()[0] + out[:, 5:].tolist()[1]
    assert torch.equal(out, wrapper.generate(ids, use_cache=False, **options))


def test_scores_are_the_logits_of_forward_on_the_sequence_so_far():
    wrapper = _memory(tiny_model("llama"), memory_tokens=3, segment_length=4)
    ids, mask = _left_padded(length=6, pad=3, seed=7)
    out = wrapper.generate(
        ids, attention_mask=mask, max_new_tokens=9, eos_token_id=None, return_dict_in_generate=True, output_scores=True
    )
    assert len(out.scores) == 9
    assert isinstance(compat.cache_of(out), RecurrentMemoryCache) and compat.cache_of(out).get_seq_length() == 6 + 9 - 1
    full_mask = torch.cat([mask, torch.ones(2, 9, dtype=torch.long)], 1)
    with torch.no_grad():
        for step, scores in enumerate(out.scores):
            length = 6 + step
            logits = wrapper(input_ids=out.sequences[:, :length], attention_mask=full_mask[:, :length]).logits[:, -1]
            torch.testing.assert_close(scores, logits, atol=1e-5, rtol=0)
            assert torch.equal(scores.argmax(-1), out.sequences[:, length])


def test_chunked_prefill_embeddings_and_a_returned_cache_give_the_same_tokens():
    wrapper = _memory(tiny_model("llama"), memory_tokens=3, segment_length=4)
    ids, mask = _left_padded(length=6, pad=3, seed=8)
    options = dict(max_new_tokens=13, eos_token_id=None)
    whole = wrapper.generate(ids, attention_mask=mask, **options)
    assert torch.equal(wrapper.generate(ids, attention_mask=mask, prefill_chunk_size=3, **options), whole)
    embeds = wrapper.hf_longctx_base.get_input_embeddings()(ids)
    assert torch.equal(wrapper.generate(inputs_embeds=embeds, attention_mask=mask, **options), whole[:, 6:])

    first = wrapper.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, return_dict_in_generate=True)
    mask = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1)
    rest = wrapper.generate(first.sequences, attention_mask=mask, max_new_tokens=7, eos_token_id=None,
                            **{compat.CACHE: compat.cache_of(first)})
    assert torch.equal(rest, whole)


def test_text_streamer_prints_the_decoded_new_tokens(capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TextStreamer

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}  # the tiny configs' special ids
    words = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<pad>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    wrapper = _memory(tiny_model("llama"), memory_tokens=2, segment_length=4)
    ids = tokenizer("w17 w40 w99 w5 w63", return_tensors="pt").input_ids
    assert ids.tolist() == [[17, 40, 99, 5, 63]]
    capsys.readouterr()
    out = wrapper.generate(ids, max_new_tokens=15, eos_token_id=None, streamer=TextStreamer(tokenizer, skip_prompt=True))
    text = tokenizer.decode(out[0, 5:])
    assert len(text.split()) == 15
    assert capsys.readouterr().out == text + "\n"


def _prompts_left_padded(lengths=(13, 6, 9), seed=11):
    """Prompts of different lengths, alone ``[1, n]`` and as one left-padded batch (ids, mask)."""
    prompts = [tokens(1, n, seed=seed + i) for i, n in enumerate(lengths)]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, -prompt.shape[1] :], mask[row, -prompt.shape[1] :] = prompt[0], 1
    return prompts, ids, mask


@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_left_padded_batch_equals_each_prompt_alone(model_type):
    """Segments of 4 with 3 memory tokens: each row is cut by its own tokens, so its logits, hidden states,
    memory and loss are those of the prompt alone; padding takes no logit and no loss."""
    wrapper = _memory(tiny_model(model_type), memory_tokens=3, segment_length=4)
    prompts, ids, mask = _prompts_left_padded()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        batch = wrapper(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        alone = [wrapper(input_ids=p, labels=p, output_hidden_states=True) for p in prompts]
    for row, (prompt, own) in enumerate(zip(prompts, alone)):
        real = mask[row].bool()
        torch.testing.assert_close(batch.logits[row, real], own.logits[0], atol=1e-5, rtol=0)
        assert not batch.logits[row, ~real].any()
        for ours, theirs in zip(batch.hidden_states, own.hidden_states):
            torch.testing.assert_close(ours[row, real], theirs[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.memory[row], own.memory[0], atol=1e-5, rtol=0)
    scored = [p.shape[1] - 1 for p in prompts]  # each prompt's own next-token losses, none for padding
    expected = sum(own.loss * n for own, n in zip(alone, scored)) / sum(scored)
    torch.testing.assert_close(batch.loss, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type, mode", [(family, "greedy") for family in FAMILIES] + [("llama", "beams")])
def test_generate_on_a_left_padded_batch_gives_each_prompts_own_tokens_and_logits(model_type, mode):
    """14 new tokens over segments of 4: the rows close their segments at their own steps."""
    wrapper = _memory(tiny_model(model_type), memory_tokens=3, segment_length=4)
    prompts, ids, mask = _prompts_left_padded()
    options = dict(max_new_tokens=14, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                   output_logits=True, **MODES[mode])
    batch = wrapper.generate(ids, attention_mask=mask, **options)
    for row, prompt in enumerate(prompts):
        own = wrapper.generate(prompt, **options)
        assert torch.equal(batch.sequences[row, ids.shape[1] :], own.sequences[0, prompt.shape[1] :])
        if mode == "greedy":
            for ours, theirs in zip(batch.logits, own.logits):
                torch.testing.assert_close(ours[row], theirs[0], atol=1e-5, rtol=0)


def test_generation_refuses_what_the_state_cannot_do():
    wrapper = _memory(tiny_model("llama"), memory_tokens=2, segment_length=4)
    ids = tokens(1, 5, seed=10)
    with pytest.raises(ValueError, match="ASSISTED_GENERATION"):
        wrapper.generate(ids, prompt_lookup_num_tokens=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="output_attentions"):
        wrapper(input_ids=ids, output_attentions=True)
    with torch.no_grad():
        filled = compat.cache_of(tiny_model("llama")(input_ids=ids, use_cache=True))
    with pytest.raises(ValueError, match="DynamicCache that already holds 5 tokens"):
        wrapper(input_ids=ids, **{compat.CACHE: filled})
    with pytest.raises(NotImplementedError, match="cannot remove 1 tokens"):
        RecurrentMemoryCache().crop(-1)


def test_generation_config_is_the_default_and_round_trips(tmp_path):
    wrapper = _memory(tiny_model("llama"), memory_tokens=2, segment_length=4)
    ids = tokens(2, 5, seed=11)
    config = GenerationConfig(max_new_tokens=9, num_beams=2, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = wrapper.generate(ids, generation_config=config)
    assert expected.shape == (2, 14)
    assert torch.equal(expected, wrapper.generate(ids, max_new_tokens=9, num_beams=2, eos_token_id=None))
    wrapper.generation_config = config
    assert wrapper.hf_longctx_base.generation_config is config
    assert torch.equal(wrapper.generate(ids), expected)
    wrapper.save_pretrained(tmp_path)
    loaded = RecurrentMemoryModel.from_pretrained(tmp_path)
    assert loaded.generation_config.to_diff_dict() == config.to_diff_dict()
    assert torch.equal(loaded.generate(ids), expected)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_save_and_reload_gives_identical_logits(tmp_path, model_type):
    wrapper = _memory(tiny_model(model_type), memory_tokens=3, segment_length=5, bptt_depth=2)
    ids = tokens(2, 17, seed=7)
    with torch.no_grad():
        expected = wrapper(input_ids=ids).logits
    wrapper.save_pretrained(tmp_path)
    assert (tmp_path / EXTRA_WEIGHTS).is_file() and not list(tmp_path.glob("*.bin"))
    loaded = RecurrentMemoryModel.from_pretrained(tmp_path)
    assert hf_longctx.applied_sections(loaded) == {"memory": {"memory_tokens": 3, "segment_length": 5}}
    assert torch.equal(loaded.memory, wrapper.memory)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    assert type(hf_longctx.unpatch(loaded)).__name__.endswith("ForCausalLM")


def test_loading_memory_of_another_shape_names_both_shapes():
    wrapper = _memory(tiny_model("llama"), memory_tokens=3)
    with pytest.raises(ValueError, match=r"\(4, 64\).*\(3, 64\)"):
        wrapper.load_hf_longctx_extra_state_dict({"memory_embeddings": torch.zeros(4, 64)})


def test_lora_on_the_wrapped_model_trains_with_the_memory(tmp_path):
    peft = pytest.importorskip("peft")
    wrapper = _memory(tiny_model("llama"), memory_tokens=2, segment_length=4)
    lora = peft.get_peft_model(wrapper.hf_longctx_base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    frozen = {n: p.detach().clone() for n, p in wrapper.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in wrapper.named_parameters() if p.requires_grad}
    assert "memory" in trainable and any("lora_" in n for n in trainable)
    assert all("lora_" in n for n in trainable if n != "memory")
    ids = tokens(2, 8, seed=8)
    optimizer = torch.optim.SGD([p for p in wrapper.parameters() if p.requires_grad], lr=0.1)
    wrapper(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    params = dict(wrapper.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert all(not torch.equal(params[n], p) for n, p in trainable.items())

    lora.merge_and_unload()
    with torch.no_grad():
        expected = wrapper(input_ids=ids).logits
    hf_longctx.save_pretrained(wrapper, tmp_path)
    with torch.no_grad():
        assert torch.equal(hf_longctx.from_pretrained(tmp_path)(input_ids=ids).logits, expected)


def test_bad_targets_are_rejected_before_anything_changes():
    from transformers import AutoModel

    from hf_longctx.testing import tiny_config

    decoder_only = AutoModel.from_config(tiny_config("llama"))
    with pytest.raises(SpecError, match="LlamaModel"):
        hf_longctx.patch(decoder_only, {"memory": {"memory_tokens": 2}})
    assert not hasattr(decoder_only.config, "hf_longctx")
    with pytest.raises(SpecError, match="memory_tokens"):
        hf_longctx.patch(tiny_model("llama"), {"memory": {"memory_tokens": -1}})


def test_preset():
    assert "rmt-16x512" in hf_longctx.list_presets()
    spec = hf_longctx.load_spec("rmt-16x512")
    assert (spec.memory.memory_tokens, spec.memory.segment_length, spec.memory.bptt_depth) == (16, 512, 2)


@pytest.mark.slow
def test_memory_task_is_learned_with_memory_and_not_without(request):
    """The passkey sits 4 segments before its question: chance is 1/16 without memory."""
    task = PasskeyTask()
    accuracy = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads, and loses much when cores are busy
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    for memory_tokens in (4, 0):
        spec = {"memory": {"memory_tokens": memory_tokens, "segment_length": task.segment_length, "bptt_depth": None}}
        wrapper = hf_longctx.patch(tiny_model("llama", seed=0), spec)
        train_memory_task(wrapper, task, seed=0)
        accuracy[memory_tokens] = evaluate_memory_task(wrapper, task, seed=1)
    assert accuracy[4] >= 0.9
    assert accuracy[0] <= 3 / task.num_values
