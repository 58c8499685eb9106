"""The ``tiling`` section: tiled MLPs, layer checkpointing and offload give the untiled model's loss and gradients.

The oracle is the unpatched transformers model on the same packed batch (documents with
restarting ``position_ids``), float32, every parameter's gradient compared.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tokens
from torch import nn

import hf_longctx
from hf_longctx import SpecError, compat
from hf_longctx.loss.tiling import default_tile_sizes
from hf_longctx.testing import tiny_model
from hf_longctx.training import pack_documents

EVERYTHING = {"mlp_tile_size": 5, "checkpointing": True, "offload": True}


def _batch(length: int = 41) -> dict[str, torch.Tensor]:
    documents = [tokens(1, n, seed=s)[0].tolist() for s, n in enumerate((13, 17, length))]
    (row,) = pack_documents(documents, length)
    return {k: torch.tensor([v]) for k, v in row.items()}


def _loss_and_grads(model, batch, **options):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **options).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_gradients(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, g in want.items():
        scale = g.abs().max().clamp(min=1e-30)
        error = ((got[name] - g).abs().max() / scale).item()
        assert error <= 1e-5, f"{name}: relative gradient difference {error:.2g}"


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox", "gemma2", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("options", [EVERYTHING, {"mlp_tile_size": 4}], ids=["everything", "mlp-only"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["use_cache-true", "use_cache-false"])
def test_tiled_step_has_the_untiled_loss_and_gradients(model_type, options, use_cache):
    """With ``use_cache: true`` (configs as shipped) and checkpointing, the oracle is transformers' own gradient
    checkpointing, which trains without a cache; otherwise it is the plain model."""
    model = tiny_model(model_type).train()
    model.config.use_cache = use_cache
    batch = _batch()
    if use_cache and options.get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    want_loss, want = _loss_and_grads(model, batch)
    model.gradient_checkpointing_disable()
    hf_longctx.patch(model, {"tiling": options, "loss": {"chunk_size": 7}})
    calls = []
    mlp = hf_longctx.families.get_family(model).mlp_modules(model)[0]
    handle = mlp.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[-2]))
    got_loss, got = _loss_and_grads(model, batch)
    handle.remove()
    assert calls and max(calls) == 41  # the wrapped forward sees the whole sequence and tiles inside
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    _assert_same_gradients(got, want)


def test_dropout_draws_the_same_masks_when_recomputed():
    model = tiny_model("llama", attention_dropout=0.3).train()
    assert model.config.use_cache  # as shipped: the tiled step turns the cache off, so does the oracle here
    batch = _batch()
    torch.manual_seed(1)
    want_loss, want = _loss_and_grads(model, batch, use_cache=False)
    torch.manual_seed(2)
    other_loss, _ = _loss_and_grads(model, batch, use_cache=False)
    assert other_loss != want_loss  # the dropout is real: another seed gives another loss
    hf_longctx.patch(model, tiling=EVERYTHING)
    torch.manual_seed(1)
    got_loss, got = _loss_and_grads(model, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    _assert_same_gradients(got, want)


def test_lora_adapters_inside_tiled_mlps_get_their_gradients():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama").train()
    assert model.config.use_cache
    batch = _batch()
    hf_longctx.patch(model, tiling=EVERYTHING)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "gate_proj", "down_proj"],
                                                  init_lora_weights=False))
    got_loss, got = _loss_and_grads(peft_model, batch)
    hf_longctx.unpatch(model)
    want_loss, want = _loss_and_grads(peft_model, batch, use_cache=False)
    assert any("gate_proj.lora_A" in name for name in want) and len(got) == len(want)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    _assert_same_gradients(got, want)


def test_unpatch_restores_the_modules_and_eval_logits_are_unchanged():
    model = tiny_model("mixtral").eval()
    ids = tokens(2, 30)
    with torch.no_grad():
        before = model(ids).logits
        hf_longctx.patch(model, tiling=EVERYTHING)
        tiled = model(ids).logits
        hf_longctx.unpatch(model)
        after = model(ids).logits
    torch.testing.assert_close(tiled, before, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, before)
    family = hf_longctx.families.get_family(model)
    assert all("forward" not in vars(m) for m in [*family.mlp_modules(model), *family.layers(model)])


class _CenteredMLP(nn.Module):
    """An MLP whose output depends on every token of the sequence (like a capacity-limited MoE)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.proj(x - x.mean(dim=-2, keepdim=True))


def test_refuses_an_mlp_whose_tokens_are_not_independent():
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp = _CenteredMLP(model.config.hidden_size)
    with pytest.raises(SpecError, match="its tokens are not independent"):
        hf_longctx.patch(model, tiling={})
    assert "hf_longctx" not in vars(model.config)
    hf_longctx.patch(model, tiling={"mlp": False, "checkpointing": True})  # checkpointing alone is exact


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"tiling": {"offload": True}}, "needs checkpointing: true"),
        ({"tiling": {"mlp": False}}, "does nothing"),
        ({"tiling": {"mlp_tile_size": 0}}, "must be >= 1"),
        ({"tiling": {}, "moe": {"num_experts": 4, "top_k": 2}}, "'tiling' and 'moe' cannot be combined"),
    ],
)
def test_refuses_bad_tiling_specs(spec, match):
    with pytest.raises(SpecError, match=match):
        hf_longctx.patch(tiny_model("llama"), spec)


def test_refuses_router_logits_and_double_checkpointing():
    model = tiny_model("mixtral", output_router_logits=True)
    with pytest.raises(SpecError, match="output_router_logits"):
        hf_longctx.patch(model, tiling={})
    model = tiny_model("llama").train()
    hf_longctx.patch(model, tiling={"checkpointing": True})
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(RuntimeError, match="already checkpoints every layer"):
        model(tokens(1, 20), labels=tokens(1, 20))


def test_default_tiles_follow_the_widths():
    model = tiny_model("llama", hidden_size=48, intermediate_size=96, head_dim=12)
    assert default_tile_sizes(model.config) == {"mlp_tile_size": 48, "loss_chunk_size": 48}


def _activation_peak(layers: int, length: int, spec: dict | None) -> float:
    """Peak activation bytes (MemTracker) of one forward + backward of a small Llama built from a config as shipped
    (``use_cache: true``)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=length)
    assert config.use_cache is True
    model = LlamaForCausalLM(config).train()
    if spec is not None:
        hf_longctx.patch(model, spec)
    ids = tokens(1, length, vocab=config.vocab_size)
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        model(input_ids=ids, labels=ids).loss.backward()
    peak = tracker.get_tracker_snapshot("peak")
    return next(v for d, v in peak.items() if d.type == "cpu").get("Activation", 0)


def test_checkpointing_keeps_only_the_layer_inputs_with_use_cache_true():
    """Between 4 and 8 layers the activations grow by about one checkpointed input ([tokens, hidden]) per layer,
    on a config that says use_cache: true; without tiling they grow by several (the measure can tell)."""
    length = 1024
    unit = length * 64 * 4  # one layer's checkpointed input: tokens x hidden x fp32
    spec = {"tiling": {"mlp": False, "checkpointing": True}}
    growth = (_activation_peak(8, length, spec) - _activation_peak(4, length, spec)) / 4 / unit
    assert 0.9 <= growth <= 1.15, f"{growth:.2f} checkpointed inputs per layer"
    plain = (_activation_peak(8, length, None) - _activation_peak(4, length, None)) / 4 / unit
    assert plain > 3, f"without tiling {plain:.2f} inputs per layer"


def test_training_step_builds_no_cache_but_eval_keeps_it():
    model = tiny_model("llama").train()
    hf_longctx.patch(model, tiling={"checkpointing": True})
    ids = tokens(1, 20)
    out = model(ids, labels=ids)
    cache = out.get(compat.CACHE)
    assert cache is None or cache.get_seq_length() == 0
    with torch.no_grad():  # no gradients: the layers run as they are, with the cache that generation needs
        cache = model(ids).get(compat.CACHE)
    assert cache is not None and cache.get_seq_length() == 20
    model.eval()
    with torch.no_grad():
        cache = model(ids).get(compat.CACHE)
    assert cache is not None and cache.get_seq_length() == 20


# ---------------------------------------------------------------- the benchmarks' CPU parts

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _rows(table: str) -> dict[str, list[str]]:
    return {cells[1]: cells for line in table.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


@pytest.mark.parametrize("boundary", [100, 4096, 5000, 12288, 70000, 10**9])
def test_longest_sequence_search_finds_the_largest_fitting_multiple(boundary):
    sys.path.insert(0, str(BENCHMARKS))
    from longest_sequence import longest

    tried = []
    found = longest(lambda n: tried.append(n) or n <= boundary, 4096, 2**20, 1024)
    want = 0 if boundary < 4096 else min(boundary // 1024 * 1024, 2**20)
    assert found == want
    assert len(tried) <= 2 * 20 + 1  # doubling then bisection, not a scan


def test_longest_sequence_runs_its_step_on_the_cpu():
    out = _benchmark("benchmarks/longest_sequence.py", "--device", "cpu", "--layers", "1", "--start", "64",
                     "--max_tokens", "64", "--multiple", "64", "--only", "+ offload")
    (row,) = [line for line in out.splitlines() if line.startswith("| + offload |")]
    assert row.split("|")[2].strip() == "64"  # the step ran (nothing runs out of memory on the CPU)


def test_seq_tiling_options_keep_the_loss():
    out = _benchmark("benchmarks/seq_tiling.py", "--tokens", "256", "--layers", "2", "--only", "plain", "+ tiled",
                     "+ offload")
    rows = [cells for cells in _rows(out).values() if cells[0] == "256" and cells[-1] not in ("", "loss")]
    assert [r[1] for r in rows] == ["plain", "+ tiled MLP", "+ offload"]
    assert len({r[-1] for r in rows}) == 1  # the same loss with every option


def test_tiled_training_under_fsdp2_follows_the_untiled_run(tmp_path):
    """Two CPU processes of real FSDP2 (the recipe's tiny config), three steps of full fine-tuning: the tiled
    run's losses after the first step (which depend on its gradients) are the untiled run's."""
    import json
    import socket

    repo = BENCHMARKS.parent
    runs = {}
    for name, patch in [("plain", {"rope": {"type": "yarn", "factor": 4.0}, "loss": {"chunk_size": 128}}),
                        ("tiled", {"rope": {"type": "yarn", "factor": 4.0}, "loss": {"chunk_size": 128},
                                   "tiling": {"mlp_tile_size": 48, "checkpointing": True, "offload": True}})]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(repo / "recipes/accelerate/cpu.yaml"), "--main_process_port", str(port),
                   str(repo / "recipes/finetune.py"), "--config", str(repo / "recipes/configs/tiny.yaml"),
                   "--output_dir", str(tmp_path / name), "--max_steps", "3", "--save_strategy", "no",
                   "--patch", json.dumps(patch)]
        runs[name] = subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    losses = {}
    for name, proc in runs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
        log = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        losses[name] = [entry["loss"] for entry in log if "loss" in entry]
    assert len(losses["plain"]) == 3
    torch.testing.assert_close(torch.tensor(losses["tiled"]), torch.tensor(losses["plain"]), rtol=1e-5, atol=0)


def test_checkpointing_keeps_a_layer_that_returns_a_tuple():
    model = tiny_model("llama").train()
    batch = {"input_ids": tokens(2, 30), "labels": tokens(2, 30)}
    want_loss, want = _loss_and_grads(model, batch)
    for layer in model.model.layers:  # a layer of the older form: (hidden_states,)
        layer.forward = (lambda forward: lambda *a, **k: (forward(*a, **k),))(layer.forward)
    model.model.forward = _indexing_decoder(model.model)
    hf_longctx.patch(model, tiling={"mlp": False, "checkpointing": True})
    got_loss, got = _loss_and_grads(model, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    _assert_same_gradients(got, want)


def _indexing_decoder(decoder):
    """The decoder's forward for layers that return tuples: it takes element 0, as older modeling code does."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    def forward(input_ids=None, **kwargs):
        hidden = decoder.embed_tokens(input_ids)
        position_ids = torch.arange(input_ids.shape[1])[None]
        position_embeddings = decoder.rotary_emb(hidden, position_ids)
        for layer in decoder.layers:  # no mask: one causal sequence per row
            hidden = layer(hidden, attention_mask=None, position_ids=position_ids,
                           position_embeddings=position_embeddings)[0]
        return BaseModelOutputWithPast(last_hidden_state=decoder.norm(hidden))

    return forward
