"""A synthetic task that needs memory: a passkey in the first segment, the question segments later.

Every example is ``num_segments * segment_length`` tokens of random filler. The first segment
holds ``KEY v`` at a random place (v one of ``num_values`` value tokens); the last segment ends
with ``QUERY v``, and only that ``v`` is scored. With a segment-local model the answer is
visible only through memory: without memory the best possible accuracy is chance,
``1 / num_values``.

:func:`train_memory_task` trains a wrapped model on fresh batches and :func:`evaluate_memory_task`
scores it on held-out examples (another seed); ``benchmarks/memory.py`` and the slow test use them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class PasskeyTask:
    segment_length: int = 8
    num_segments: int = 5  # the question is num_segments - 1 segments after the passkey
    num_values: int = 16
    key_token: int = 3
    query_token: int = 4
    first_value: int = 5  # value tokens are first_value .. first_value + num_values - 1; filler above them
    vocab_size: int = 128

    def __post_init__(self):
        if self.first_value + self.num_values >= self.vocab_size:
            raise ValueError(
                f"num_values={self.num_values} leaves no filler tokens in a vocabulary of {self.vocab_size} "
                f"(values start at {self.first_value})"
            )
        if self.num_segments < 2 or self.segment_length < 3:
            raise ValueError(
                f"need num_segments >= 2 and segment_length >= 3, got {self.num_segments} and {self.segment_length}"
            )

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids [size, T], labels [size, T], answers [size])``; labels are -100 except the answer."""
        length = self.segment_length * self.num_segments
        filler_low = self.first_value + self.num_values
        ids = torch.randint(filler_low, self.vocab_size, (size, length), generator=generator)
        answers = torch.randint(self.first_value, filler_low, (size,), generator=generator)
        rows = torch.arange(size)
        where = torch.randint(0, self.segment_length - 1, (size,), generator=generator)
        ids[rows, where] = self.key_token
        ids[rows, where + 1] = answers
        ids[:, -2] = self.query_token
        ids[:, -1] = answers
        labels = torch.full_like(ids, -100)
        labels[:, -1] = answers
        return ids, labels, answers


@torch.no_grad()
def evaluate_memory_task(model, task: PasskeyTask, examples: int = 512, seed: int = 1, batch_size: int = 128) -> float:
    """Accuracy of the answer (argmax over the whole vocabulary) on ``examples`` held-out examples."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, examples, batch_size):
        ids, _, answers = task.batch(min(batch_size, examples - start), generator)
        logits = model(input_ids=ids.to(model.device)).logits[:, -2]
        correct += (logits.argmax(dim=-1).cpu() == answers).sum().item()
    model.train(was_training)
    return correct / examples


def train_memory_task(
    model, task: PasskeyTask, steps: int = 300, batch_size: int = 32, lr: float = 3e-3, seed: int = 0, desc: str = "train"
) -> list[float]:
    """Train every parameter of ``model`` (a RecurrentMemoryModel) with AdamW; returns the loss per step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for _ in (bar := tqdm(range(steps), desc=desc)):
        ids, labels, _ = task.batch(batch_size, generator)
        loss = model(input_ids=ids.to(model.device), labels=labels.to(model.device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
