"""Context parallelism: configuration, refusals, label shift before sharding, loss reduction over 2 processes.

torch's context-parallel attention intercepts only the CUDA SDPA kernels, so on this CPU the
attention itself is not sharded: the two-process test runs the decoder on the whole sequence
in each process and shards its hidden states with torch's own ``context_parallel`` buffer
sharding (the head-tail load balancer), then reduces the chunked loss and the gradients as
transformers' Trainer and FSDP do. The oracle is the unpatched model's own loss and gradients
on the unsharded packed batches, accumulated over two micro-batches. The attention numerics
under context parallelism run in ``benchmarks/gpu.sh`` on two GPUs or more.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tokens

import hf_longctx
from hf_longctx.testing import tiny_model
from hf_longctx.training import pack_documents, parse_args
from hf_longctx.training.context_parallel import check_context_parallel, parallelism_config
from hf_longctx.training.loss import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]
LENGTH = 48  # a multiple of 2 x 2: each of the two ranks holds a chunk from the front and one from the back


def _micro_batches() -> list[dict[str, torch.Tensor]]:
    """Two packed micro-batches (documents with restarting positions) with different numbers of loss tokens."""
    batches = []
    for seed, lengths in ((0, (13, 20, 30)), (5, (7, 41))):
        documents = [tokens(1, n, seed=seed + i)[0].tolist() for i, n in enumerate(lengths)]
        (row,) = pack_documents(documents, LENGTH)
        batches.append({k: torch.tensor([v]) for k, v in row.items()})
    batches[1]["labels"][0, 30:40] = IGNORE_INDEX  # an unlabelled span: the token counts differ
    return batches


def _shift(labels: torch.Tensor) -> torch.Tensor:
    # What transformers' Trainer does before sharding (_prepare_context_parallel_inputs).
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].contiguous()


def _model():
    torch.manual_seed(0)
    model = tiny_model("llama").train()
    model.config.use_cache = False
    return model


def _reference() -> dict:
    """The unpatched model, unsharded: loss summed over the micro-batches, each divided by the step's token count."""
    model = _model()
    batches = _micro_batches()
    num_items = sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in batches)
    total = 0.0
    for batch in batches:
        loss = model(**batch, num_items_in_batch=num_items).loss
        loss.backward()
        total += loss.item()
    return {"loss": total, "grads": {n: p.grad.tolist() for n, p in model.named_parameters()}}


def _worker(out: Path) -> None:
    """One of 2 gloo processes: its shard of each micro-batch's tokens, Trainer's loss scaling, FSDP's averaging."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    model = _model()
    hf_longctx.patch(model, {"loss": {"chunk_size": 5}, "tiling": {"mlp_tile_size": 4, "checkpointing": True}})
    batches = _micro_batches()
    # transformers' Trainer: tokens counted before sharding, gathered over all processes, divided by cp_size.
    local = sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in batches)
    gathered = local.clone()
    dist.all_reduce(gathered)
    num_items = gathered / world
    total = torch.zeros(())
    owned = []
    for batch in batches:
        shift_labels = _shift(batch["labels"])
        labels = batch["labels"].clone()
        index = torch.arange(LENGTH)[None]
        with context_parallel(mesh, buffers=[index, labels, shift_labels], buffer_seq_dims=[1, 1, 1],
                              no_restore_buffers={index, labels, shift_labels}):
            pass
        owned.append(index[0].tolist())
        # attention over a sharded sequence needs CUDA in torch: the decoder runs on the whole sequence and
        # its output is cut to this rank's positions, where the model's head and loss take over.
        decoder = hf_longctx.families.get_family(model).decoder(model)

        def shard(_module, _args, output, positions=index[0]):
            output.last_hidden_state = output.last_hidden_state[:, positions]
            return output

        hook = decoder.register_forward_hook(shard)
        try:
            loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=labels,
                         shift_labels=shift_labels, num_items_in_batch=num_items).loss
        finally:
            hook.remove()
        loss = loss * world  # Trainer.compute_loss: times num_processes under average_tokens_across_devices
        loss.backward()
        reported = loss.detach().clone()
        dist.all_reduce(reported)
        total += reported / world
    grads = {}
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad)  # FSDP's reduce-scatter averages over the dp_shard x cp mesh
        grads[name] = (p.grad / world).tolist()
    rank = dist.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps({"loss": total.item(), "grads": grads, "owned": owned}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_chunked_loss_over_two_processes_equals_the_unsharded_loss(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(Path(__file__)), str(tmp_path)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # torch's head-tail sharding: rank 0 holds the first and last quarter, rank 1 the middle half.
    assert ranks[0]["owned"][0] == [*range(0, 12), *range(36, 48)]
    assert ranks[1]["owned"][0] == list(range(12, 36))
    want = _reference()
    for got in ranks:
        assert abs(got["loss"] - want["loss"]) <= 1e-6 * abs(want["loss"])
        for name, g in want["grads"].items():
            g, h = torch.tensor(g), torch.tensor(got["grads"][name])
            assert ((h - g).abs().max() / g.abs().max()).item() <= 1e-5, name


def test_chunked_loss_takes_shift_labels_as_given():
    model = _model()
    batch = _micro_batches()[0]
    shift_labels = _shift(batch["labels"])
    want = model(**batch).loss
    hf_longctx.patch(model, {"loss": {"chunk_size": 7}})
    garbage = torch.full_like(batch["labels"], 5)  # sharded labels no longer line up: shift_labels must win
    got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=garbage,
                shift_labels=shift_labels).loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.fixture
def fsdp2_launch(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")


def test_a_full_attention_model_passes_and_maps_to_accelerate(fsdp2_launch):
    check_context_parallel(tiny_model("llama"), 4, 1024, packing=False, world_size=8, cuda=True)
    config = parallelism_config(4, 8)
    assert (config.cp_size, config.dp_shard_size, config.cp_backend) == (4, 2, "torch")


@pytest.mark.parametrize(
    "model_type, spec, kwargs, match",
    [
        ("mistral", None, {}, "sliding window of"),
        ("gemma2", None, {}, "sliding_attention"),
        ("llama", {"alibi": {}}, {}, "the 'alibi' patch"),
        ("llama", {"attention": {"sliding_window": 16}}, {}, "the 'attention' patch"),
        ("llama", {"attention": {"backend": "eager"}}, {}, "the 'attention' patch"),
        ("gpt_oss", None, {}, "sink logits"),
        ("llama", None, {"cuda": False}, "no CUDA device"),
        ("llama", None, {"packing": True}, "packing: true"),
        ("llama", None, {"context_length": 1026}, "not a multiple of 2 x 4"),
        ("llama", None, {"world_size": 6}, "6 processes cannot be split"),
    ],
)
def test_refuses_what_the_engine_cannot_do_exactly(fsdp2_launch, model_type, spec, kwargs, match):
    model = tiny_model(model_type)
    if spec is not None:
        hf_longctx.patch(model, spec)
    arguments = {"context_length": 1024, "packing": False, "world_size": 8, "cuda": True, **kwargs}
    with pytest.raises(ValueError, match=match):
        check_context_parallel(model, 4, **arguments)


def test_refuses_eager_attention_and_a_launch_without_fsdp2(monkeypatch):
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with pytest.raises(ValueError, match="attn_implementation 'eager'") as error:
        check_context_parallel(model, 2, 1024, packing=False, world_size=2, cuda=True)
    assert "not FSDP2" in str(error.value)


def test_the_recipe_refuses_context_parallelism_at_start_up_before_reading_data(tmp_path):
    from hf_longctx.training.recipe import run

    args = parse_args(["--config", str(REPO / "recipes/configs/tiny.yaml"), "--output_dir", str(tmp_path),
                       "--context_parallel_size", "2", "--context_length", "256", "--dataset", str(tmp_path / "none.jsonl")])
    with pytest.raises(ValueError, match="context_parallel_size 2 cannot be used exactly: no CUDA device"):
        run(*args)


def test_the_recipe_refuses_two_kinds_of_checkpointing_at_once(tmp_path):
    from hf_longctx.training.recipe import run

    args = parse_args(["--config", str(REPO / "recipes/configs/tiny.yaml"), "--output_dir", str(tmp_path),
                       "--patch", json.dumps({"tiling": {"checkpointing": True}}),
                       "--activation_checkpointing", "true", "--dataset", str(tmp_path / "none.jsonl")])
    with pytest.raises(ValueError, match="checkpoints every layer already"):
        run(*args)


def test_without_packing_every_sequence_is_one_document():
    documents = [list(range(3, 13)), list(range(20, 23)), list(range(30, 39))]
    rows = list(pack_documents(documents, 4, packing=False))
    assert [r["input_ids"] for r in rows] == [[3, 4, 5, 6], [7, 8, 9, 10], [30, 31, 32, 33], [34, 35, 36, 37]]
    assert all(r["position_ids"] == [0, 1, 2, 3] for r in rows)
    assert all(r["labels"] == [IGNORE_INDEX, *r["input_ids"][1:]] for r in rows)


def test_the_128k_recipe_starts_on_cpu_with_a_tiny_model_and_the_same_flags(tmp_path):
    """The 128k recipe under a 2-process CPU FSDP2 launch, one step: its patch (tiling with checkpointing and
    offload, chunked loss), LoRA, packing: false, activation_checkpointing: false; a tiny model and one process
    per sequence (a CPU cannot run context-parallel attention)."""
    recipe = REPO / "recipes/configs/llama3.1-8b-128k-lora.yaml"
    command = recipe.read_text().splitlines()[0].lstrip("# ")
    assert command in (REPO / "docs" / "finetuning.md").read_text()  # the documented command is the recipe's
    config = yaml.safe_load(recipe.read_text())
    tiny = yaml.safe_load((REPO / "recipes/configs/tiny.yaml").read_text())
    del config["model_name_or_path"]
    config.update(model_config={**tiny["model_config"], "max_position_embeddings": 256},
                  tokenizer_name_or_path=tiny["tokenizer_name_or_path"], dataset=tiny["dataset"], context_length=256,
                  context_parallel_size=1, dtype="float32", bf16=False, split="train", text_column="text")
    path = tmp_path / "tiny-128k-shape.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "recipes/accelerate/cpu.yaml"), "--main_process_port", str(_free_port()),
              str(REPO / "recipes/finetune.py"), "--config", str(path), "--output_dir", str(out), "--max_steps", "1"]
    proc = subprocess.run(launch, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in log if "loss" in entry] == [1]
    assert (out / "adapter").is_dir()
    assert hf_longctx.applied_sections(hf_longctx.from_pretrained(out)) == hf_longctx.load_spec(config["patch"]).to_dict()
    assert hf_longctx.applied_sections(hf_longctx.from_pretrained(out))["tiling"] == {"checkpointing": True,
                                                                                      "offload": True}


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
