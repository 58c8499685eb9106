"""Shared fixtures: quiet transformers, deterministic torch, Triton's interpreter without a GPU."""

import os
import shutil

# Triton reads TRITON_INTERPRET when it is imported: set it before anything can import it.
# Without a CUDA device the kernels run (slowly, correctly) in the interpreter on the CPU.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()

ALL_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gpt_neox"]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def tokens(batch: int = 1, length: int = 48, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    """Random token ids that avoid the special ids 0-2 of the tiny configs."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


def snapshot(model, x):
    """(logits on x, config dict, cloned state dict): what ``assert_same`` compares against."""
    with torch.no_grad():
        logits = model(x).logits
    return logits, model.config.to_dict(), {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model, x, snap):
    """The model gives bit-identical logits and has the config and weights of ``snap``."""
    logits, config, state = snap
    with torch.no_grad():
        assert torch.equal(model(x).logits, logits)
    assert model.config.to_dict() == config
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
