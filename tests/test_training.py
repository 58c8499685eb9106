"""Fine-tuning recipe: packing, chunked loss, LoRA merge, and real 2-process FSDP2 runs on the CPU.

The multi-process tests launch ``accelerate launch --config_file recipes/accelerate/cpu.yaml``
three times, concurrently where possible: the acceptance command itself (tiny.yaml, 20 steps,
checkpoints at 10 and 20), a run resumed from only that run's ``checkpoint-10`` (all that a run
killed after step 10 leaves), and this file as a worker script that trains full fine-tuning
and LoRA for 2 steps each and records, on every rank, how each parameter is sharded.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tokens
from safetensors.torch import load, load_file
from transformers.loss.loss_utils import ForCausalLMLoss

import hf_longctx
from hf_longctx.testing import tiny_model
from hf_longctx.training import (
    LoraArguments,
    ModelArguments,
    add_lora,
    causal_lm_loss,
    chunked_cross_entropy,
    load_documents,
    load_model,
    merge_adapter,
    pack_documents,
    parse_args,
    use_chunked_loss,
)
from hf_longctx.training.loss import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = REPO / "recipes/accelerate/cpu.yaml"
TINY = REPO / "recipes/configs/tiny.yaml"
HUB_TOKEN = "hf_fake_hub_token"
HUB_REPO = "tester/tiny-recipe"
MOE_PATCH = {"rope": {"type": "yarn", "factor": 4.0}, "moe": {"num_experts": 4, "top_k": 2}}

TINY_SPEC = {"rope": {"type": "yarn", "factor": 4.0}, "loss": {"chunk_size": 128}}  # recipes/configs/tiny.yaml


def _doc(length: int, seed: int) -> list[int]:
    return tokens(1, length, seed=seed)[0].tolist()


# ---------------------------------------------------------------- packing


def test_pack_documents_positions_labels_and_splitting():
    docs = [_doc(5, 1), _doc(9, 2), _doc(3, 3)]  # 17 tokens -> two sequences of 8, one token dropped
    packed = list(pack_documents(docs, 8))
    assert len(packed) == 2
    assert packed[0]["input_ids"] + packed[1]["input_ids"] == (docs[0] + docs[1] + docs[2])[:16]
    assert packed[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2]  # doc 2 is cut after 3 tokens ...
    assert packed[1]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1]  # ... and its rest restarts at 0
    for row in packed:
        expected = [IGNORE_INDEX if p == 0 else t for t, p in zip(row["input_ids"], row["position_ids"])]
        assert row["labels"] == expected


@pytest.mark.parametrize(
    "model_type, spec, overrides",
    [
        ("llama", None, {}),
        ("llama", {"rope": {"type": "yarn", "factor": 4.0}}, {}),
        ("qwen2", {"alibi": {}}, {}),
        ("mistral", None, {"sliding_window": 6}),
        ("mistral", {"attention": {"sliding_window": 6, "sink_tokens": 2}}, {}),
        ("gpt_neox", None, {}),
    ],
    ids=["llama", "llama-yarn", "qwen2-alibi", "mistral-window", "mistral-window-sinks", "gpt_neox"],
)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_document_logits_equal_document_alone(model_type, spec, overrides, attn):
    """transformers turns restarting position_ids into a block-diagonal mask: no attention across documents."""
    model = tiny_model(model_type, attn_implementation=attn, **overrides)
    if spec is not None:
        hf_longctx.patch(model, spec)
    model.config.use_cache = False
    docs = [_doc(n, seed) for seed, n in enumerate([11, 20, 7, 9])]
    (row,) = pack_documents(docs, sum(map(len, docs)))
    with torch.no_grad():
        packed = model(
            input_ids=torch.tensor([row["input_ids"]] * 2), position_ids=torch.tensor([row["position_ids"]] * 2)
        ).logits
        start = 0
        for doc in docs:
            alone = model(input_ids=torch.tensor([doc])).logits[0]
            for b in range(2):
                torch.testing.assert_close(packed[b, start : start + len(doc)], alone, rtol=0, atol=1e-5)
            start += len(doc)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".txt"])
def test_load_documents_reads_local_files(tmp_path, suffix):
    from datasets import Dataset

    texts = ["first document", "second one", "third"]
    path = tmp_path / f"docs{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(texts) + "\n")
    elif suffix == ".parquet":
        Dataset.from_dict({"text": texts}).to_parquet(str(path))
    else:
        Dataset.from_dict({"text": texts}).to_json(str(path), lines=suffix == ".jsonl")
    assert load_documents(str(path))["text"] == texts


def test_load_documents_rejects_unknown_file_kind(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text("text\na\n")
    with pytest.raises(ValueError, match=r"docs\.csv.*suffix .json, .jsonl, .parquet, .txt"):
        load_documents(str(path))


# ---------------------------------------------------------------- chunked loss


@pytest.mark.parametrize("num_items", [None, 37])
def test_chunked_cross_entropy_matches_transformers_loss_and_gradients(num_items):
    torch.manual_seed(0)
    batch, length, hidden_size, vocab = 2, 45, 16, 50
    hidden = torch.randn(batch, length, hidden_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length))
    labels[0, :5] = IGNORE_INDEX
    labels[1, 30:] = IGNORE_INDEX
    grad_out = torch.tensor(1.7, dtype=torch.float64)  # a non-unit upstream gradient

    expected = ForCausalLMLoss(hidden @ weight.t(), labels, vocab, num_items_in_batch=num_items)
    expected_grads = torch.autograd.grad(expected * grad_out, (hidden, weight))
    for chunk in (7, 1000):  # ragged chunks, and one chunk for everything
        loss = causal_lm_loss(hidden, weight, labels, chunk_size=chunk, num_items_in_batch=num_items)
        grads = torch.autograd.grad(loss * grad_out, (hidden, weight))
        torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_cross_entropy_float32_and_all_ignored():
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (10,))
    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)
    torch.testing.assert_close(chunked_cross_entropy(hidden, weight, targets, chunk_size=3), expected, rtol=1e-5, atol=1e-5)
    ignored = torch.full((10,), IGNORE_INDEX)
    assert chunked_cross_entropy(hidden, weight, ignored, chunk_size=3).item() == 0.0


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox"])
def test_use_chunked_loss_matches_model_loss_and_parameter_gradients(model_type):
    model = tiny_model(model_type).train()
    (row,) = pack_documents([_doc(13, 1), _doc(20, 2), _doc(15, 3)], 48)
    batch = {k: torch.tensor([v]) for k, v in row.items()}
    model.config.use_cache = False
    expected = model(**batch).loss
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    assert use_chunked_loss(model, chunk_size=5) is model
    assert hf_longctx.applied_sections(model) == {"loss": {"chunk_size": 5}}
    out = model(**batch)
    assert out.logits is None
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    for (name, _), got, want in zip(model.named_parameters(), grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # without labels: the original forward, logits included
        assert model(input_ids=batch["input_ids"]).logits.shape == (1, 48, 128)
    hf_longctx.unpatch(model)
    assert "forward" not in vars(model) and "forward" not in vars(model.get_output_embeddings())


# ---------------------------------------------------------------- configuration


def test_parse_args_reads_yaml_and_command_line_overrides(tmp_path):
    model_args, data_args, lora_args, training_args = parse_args(
        ["--config", str(TINY), "--output_dir", str(tmp_path), "--learning_rate", "1e-4", "--lora", "true",
         "--patch", '{"rope": {"type": "linear", "factor": 2.0}}', "--lora_target_modules", "q_proj", "v_proj"]
    )
    assert model_args.model_config["model_type"] == "llama"
    assert model_args.patch == {"rope": {"type": "linear", "factor": 2.0}}  # the command line replaces the config's
    assert data_args.context_length == 256 and data_args.dataset.endswith("tiny.jsonl")
    assert lora_args.lora and lora_args.lora_target_modules == ["q_proj", "v_proj"]
    assert training_args.learning_rate == 1e-4 and training_args.max_steps == 20
    assert training_args.output_dir == str(tmp_path)
    model_args, *_ = parse_args(["--config", str(TINY), "--output_dir", str(tmp_path)])
    assert model_args.patch == {"rope": {"type": "yarn", "factor": 4.0}, "loss": {"chunk_size": 128}}


def test_parse_args_rejects_unknown_config_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(f"context_lenght: 8\ndataset: {REPO}/recipes/data/tiny.jsonl\n")
    with pytest.raises(ValueError, match="unknown config key 'context_lenght'"):
        parse_args(["--config", str(config)])


def test_parse_args_rejects_push_of_an_unmerged_lora_run(tmp_path):
    """The push uploads the merged model; an unmerged LoRA run has none, so it fails before training."""
    argv = ["--config", str(TINY), "--output_dir", str(tmp_path), "--lora", "true", "--push_to_hub", "true"]
    assert parse_args(argv)[3].push_to_hub  # merged (the default): accepted
    with pytest.raises(ValueError, match="needs merge_lora: true"):
        parse_args([*argv, "--merge_lora", "false"])


def test_every_recipe_config_parses_and_names_its_launch_command():
    for path in sorted((REPO / "recipes/configs").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# accelerate launch --config_file recipes/accelerate/"), path.name
        assert f"--config recipes/configs/{path.name}" in first, path.name
        parse_args(["--config", str(path), "--output_dir", "unused", "--bf16", "false"])  # bf16 needs a GPU


# ---------------------------------------------------------------- LoRA


def test_lora_adapter_saves_and_merges_into_patched_model(tmp_path):
    """LongLoRA: adapters + trained embeddings and norms; saved, reloaded, merged, saved with the patch."""
    model_args = ModelArguments(
        model_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128,
                      "max_position_embeddings": 64},
        patch={"rope": {"type": "yarn", "factor": 4.0}},
    )
    peft_model = add_lora(load_model(model_args, seed=3), LoraArguments())
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert any("input_layernorm.modules_to_save" in n for n in trainable)
    assert any(n.endswith("model.norm.modules_to_save.default.weight") for n in trainable)

    (row,) = pack_documents([_doc(100, 1), _doc(60, 2)], 160)  # beyond the 64 trained positions
    batch = {k: torch.tensor([v]) for k, v in row.items()}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(3):
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    ids = torch.tensor([_doc(160, 9)])
    with torch.no_grad():
        trained = peft_model(input_ids=ids).logits
        base_logits = load_model(model_args, seed=3)(input_ids=ids).logits
    assert (trained - base_logits).abs().max() > 1e-3  # the adapters and saved modules changed the model

    peft_model.save_pretrained(tmp_path / "adapter")
    merged = merge_adapter(model_args, 3, tmp_path / "adapter")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    hf_longctx.save_pretrained(merged, tmp_path / "merged")
    reloaded = hf_longctx.from_pretrained(tmp_path / "merged")
    assert hf_longctx.applied_sections(reloaded) == {"rope": {"type": "yarn", "factor": 4.0}}
    with torch.no_grad():
        for model in (merged, reloaded.eval()):
            torch.testing.assert_close(model(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- 2-process FSDP2 runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG),
               "--main_process_port", str(_free_port()), str(script), *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 420) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed:\n{out[-8000:]}"
    return out


@pytest.fixture(scope="module")
def runs():
    """Output folders of: the acceptance run, the run resumed from its checkpoint-10, the sharding worker."""
    from fake_hub import FakeHub

    with FakeHub(token=HUB_TOKEN, lifetime_s=600) as hub, tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(HF_HOME=str(tmp / "hf_home"), HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_TOKEN=HUB_TOKEN,
                   HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        full, resumed, worker, moe = tmp / "full", tmp / "resumed", tmp / "worker", tmp / "moe"
        acceptance = _launch(REPO / "recipes/finetune.py", "--config", str(TINY), "--output_dir", str(full), env=env)
        sharding = _launch(Path(__file__), str(worker), env=env)
        moe_config = tmp / "tiny-moe.yaml"
        moe_config.write_text(yaml.safe_dump({**yaml.safe_load(TINY.read_text()), "patch": MOE_PATCH}))
        moe_run = _launch(REPO / "recipes/finetune.py", "--config", str(moe_config), "--output_dir", str(moe),
                          "--max_steps", "8", "--save_steps", "100", env=env)
        _finish(acceptance)
        resumed.mkdir()
        subprocess.run(["cp", "-r", str(full / "checkpoint-10"), str(resumed)], check=True)
        resume = _launch(REPO / "recipes/finetune.py", "--config", str(TINY), "--output_dir", str(resumed),
                         "--resume_from_checkpoint", str(resumed / "checkpoint-10"), env=env)
        _finish(sharding)
        _finish(resume)
        _finish(moe_run)
        yield {"full": full, "resumed": resumed, "worker": worker, "hub": hub, "moe": moe, "moe_config": moe_config}


def test_recipe_logs_falling_loss_and_saves_patched_model(runs):
    log = json.loads((runs["full"] / "trainer_state.json").read_text())["log_history"]
    losses = [(entry["step"], entry["loss"]) for entry in log if "loss" in entry]
    assert [step for step, _ in losses] == list(range(1, 21))
    assert losses[-1][1] < 0.75 * losses[0][1], losses
    model = hf_longctx.from_pretrained(runs["full"])
    assert hf_longctx.applied_sections(model) == TINY_SPEC
    assert model.config.max_position_embeddings == 256
    initial = load_model(parse_args(["--config", str(TINY)])[0], seed=0).state_dict()
    trained = model.state_dict()
    assert all(not torch.equal(trained[k], initial[k]) for k in initial)  # every weight was trained


def test_resume_from_checkpoint_matches_uninterrupted_run(runs):
    uninterrupted = load_file(str(runs["full"] / "model.safetensors"))
    resumed = load_file(str(runs["resumed"] / "model.safetensors"))
    assert set(uninterrupted) == set(resumed)
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=1e-6, msg=key)
    logs = [json.loads((runs[run] / "trainer_state.json").read_text())["log_history"] for run in ("full", "resumed")]
    losses = [[(e["step"], e["loss"]) for e in log if "loss" in e] for log in logs]
    assert [step for step, _ in losses[1]] == list(range(1, 21))  # steps 1-10 restored from the checkpoint
    for (_, resumed_loss), (_, loss) in zip(losses[1], losses[0]):
        assert resumed_loss == pytest.approx(loss, abs=1e-6)


def test_moe_recipe_under_fsdp_trains_experts_and_router_and_saves_native_mixtral(runs):
    """An upcycled model (copies, no noise: the experts start identical) fine-tuned with FSDP2 on two
    processes: the full state dict gathered from the shards is written as a Mixtral checkpoint."""
    from transformers import AutoModelForCausalLM

    log = json.loads((runs["moe"] / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3, losses
    config = json.loads((runs["moe"] / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["factor"] == 4.0
    native, info = AutoModelForCausalLM.from_pretrained(runs["moe"], output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weight
    upcycled = load_model(parse_args(["--config", str(runs["moe_config"])])[0], seed=0)  # hf_longctx's MoE
    initial = {k: v.clone() for k, v in upcycled.state_dict().items()}
    trained = native.state_dict()
    assert set(trained) == set(initial)
    assert all(not torch.equal(trained[k], initial[k]) for k in initial)  # every weight, router included, trained
    experts = trained["model.layers.0.mlp.experts.gate_up_proj"]
    assert torch.equal(initial["model.layers.0.mlp.experts.gate_up_proj"][0], initial["model.layers.0.mlp.experts.gate_up_proj"][1])
    assert not torch.equal(experts[0], experts[1])  # tokens routed apart made the copies diverge
    ids = torch.arange(3, 100).view(1, -1)  # past the 64 trained positions: the yarn scaling is in use
    upcycled.load_state_dict(trained)  # the trained weights in hf_longctx's own MoE model: same logits
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, upcycled.eval()(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fsdp2_shards_every_parameter_across_both_processes(runs, mode):
    reports = [json.loads((runs["worker"] / mode / f"sharding-rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0].keys() == reports[1].keys()
    trainable = [name for name, info in reports[0].items() if info["requires_grad"]]
    if mode == "lora":
        assert any("lora_A" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
        assert not any("q_proj.base_layer" in n for n in trainable)
    layer_params = [n for n in reports[0] if ".layers." in n]  # activation_checkpointing: true became
    assert layer_params and all("_checkpoint_wrapped_module" in n for n in layer_params)  # FSDP2's, per layer
    for name, info in reports[0].items():
        assert info["placements"] == ["Shard(dim=0)"], name
        rows = info["shape"][0]
        local_rows = [report[name]["local_shape"][0] for report in reports]
        assert local_rows == [math.ceil(rows / 2), rows - math.ceil(rows / 2)], name


def test_lora_run_under_fsdp_saves_adapter_and_merged_patched_model(runs):
    out = runs["worker"] / "lora"
    assert (out / "adapter" / "adapter_config.json").is_file()
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k for k in adapter) and any("embed_tokens" in k for k in adapter)
    assert any(torch.count_nonzero(v) for k, v in adapter.items() if "lora_B" in k)  # lora_B starts at 0
    merged = hf_longctx.from_pretrained(out)
    assert hf_longctx.applied_sections(merged) == TINY_SPEC
    model_args = parse_args(["--config", str(TINY)])[0]
    expected = merge_adapter(model_args, 0, out / "adapter").state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)


def test_push_to_hub_uploads_model_with_patch_and_card(runs):
    files = runs["hub"].files(HUB_REPO)
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files)
    assert json.loads(files["config.json"])["hf_longctx"] == TINY_SPEC
    weights = load(files["model.safetensors"])
    assert set(weights) == set(load_model(parse_args(["--config", str(TINY)])[0], seed=0).state_dict())
    assert "- **rope**: `type` = 'yarn', `factor` = 4.0" in files["README.md"].decode()


# ---------------------------------------------------------------- worker (run by accelerate launch)


def _sharding_worker(out: Path) -> None:
    """Train full fine-tuning (then pushed) and LoRA, with activation checkpointing, for 2 steps each.

    Every rank writes how each parameter is sharded when training begins.
    """
    from transformers import TrainerCallback

    from hf_longctx.training.fsdp import prepare_cpu_fsdp, sharding_report
    from hf_longctx.training.recipe import run

    class RecordSharding(TrainerCallback):
        def __init__(self, path: Path):
            self.path = path

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(sharding_report(model)))

    prepare_cpu_fsdp()
    rank = int(os.environ["RANK"])
    common = ["--config", str(TINY), "--max_steps", "2", "--save_strategy", "no"]
    common += ["--activation_checkpointing", "true"]
    for mode, extra in [("full", ["--push_to_hub", "true", "--hub_model_id", HUB_REPO]), ("lora", ["--lora", "true"])]:
        args = parse_args([*common, "--output_dir", str(out / mode), *extra])
        run(*args, callbacks=[RecordSharding(out / mode / f"sharding-rank{rank}.json")])


if __name__ == "__main__":
    _sharding_worker(Path(sys.argv[1]))
