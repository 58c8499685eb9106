"""The sparse MoE block that replaces a dense MLP, and its initialisation from that MLP.

``SparseMoeBlock`` keeps transformers' names (``gate.weight`` ``[E, H]``,
``experts.gate_up_proj`` ``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``; ``experts.up_proj``
``[E, I, H]`` for plain two-layer MLPs; ``*_bias`` where the dense MLP has biases), so that its
state dict is the one of a Mixtral / Qwen-MoE sparse block.

Dense MLPs come in three forms (``DENSE_LAYOUTS``), each with biases or not and any activation
the MLP holds: gated (``gate_proj``/``up_proj``/``down_proj``), fused gated (``gate_up_proj``) and
plain two-layer (``fc1``/``fc2``, ``c_fc``/``c_proj``, ``dense_h_to_4h``/``dense_4h_to_h``, ``up_proj``/``down_proj``).

Two initialisations (``MoEExperts.from_dense``):

- ``copy`` (sparse upcycling, Komatsuzaki et al. 2023): every expert is the dense MLP. Any
  routing whose weights sum to 1 reproduces the dense output, so the router starts random
  (std ``initializer_range``) and tokens spread over the experts from the first step.
- ``partition`` (LLaMA-MoE): the intermediate neurons are split into ``E`` contiguous groups,
  one per expert, and each expert's output projection is scaled by ``E``. The router starts
  at zero, so the renormalised weights are uniform; with ``top_k = E`` the layer computes
  ``sum_e (1/E) * E * expert_e(x)`` = the dense MLP, and with fewer experts per token it is an
  unbiased estimate of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .dispatch import Backend, experts_forward, route

MlpKind = Literal["gated", "fused_gated", "plain"]


@dataclass(frozen=True)
class DenseLayout:
    """Where a dense MLP keeps its input projection(s) (concatenated in this order) and its output one."""

    kind: MlpKind  # gated: out(act(gate(x)) * up(x)); fused_gated: one projection, gate rows then up rows;
    in_names: tuple[str, ...]  # plain: out(act(in(x)))
    out_name: str


# Checked in order: a gated MLP also has an up_proj/down_proj pair.
DENSE_LAYOUTS: tuple[DenseLayout, ...] = (
    DenseLayout("gated", ("gate_proj", "up_proj"), "down_proj"),  # Llama, Qwen, Gemma, ...
    DenseLayout("gated", ("w1", "w3"), "w2"),
    DenseLayout("fused_gated", ("gate_up_proj",), "down_proj"),  # Phi-3, GLM
    DenseLayout("plain", ("fc1",), "fc2"),  # Phi, NanoChat
    DenseLayout("plain", ("c_fc",), "c_proj"),  # StarCoder2, GPT-2 (Conv1D)
    DenseLayout("plain", ("dense_h_to_4h",), "dense_4h_to_h"),  # GPT-NeoX, Persimmon
    DenseLayout("plain", ("up_proj",), "down_proj"),  # Nemotron, Arcee, MPT
)
_ACTIVATION_NAMES = ("act_fn", "activation_fn", "act", "activation", "gelu_impl")


def _is_projection(module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _weight(projection: nn.Module) -> torch.Tensor:
    """``[out, in]``: transformers' Conv1D (GPT-2) stores the transpose of a Linear's weight."""
    return projection.weight if isinstance(projection, nn.Linear) else projection.weight.t()


def dense_layout(mlp: nn.Module) -> DenseLayout | None:
    """The layout of a dense MLP module, or None (a mixture of experts, or an unknown form).

    A plain-named pair whose input projection is twice as wide as the output projection's input
    is a fused gated MLP (Moshi's ``fc1`` holds gate and up rows).
    """
    for layout in DENSE_LAYOUTS:
        projections = [getattr(mlp, name, None) for name in (*layout.in_names, layout.out_name)]
        if all(_is_projection(p) for p in projections):
            rows = sum(_weight(p).shape[0] for p in projections[:-1])
            if layout.kind == "plain" and rows == 2 * _weight(projections[-1]).shape[1]:
                return DenseLayout("fused_gated", layout.in_names, layout.out_name)
            return layout
    return None


class _Activation(nn.Module):
    """A plain function (``F.gelu``) held as a module, so that experts can keep it as a submodule."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def mlp_activation(mlp: nn.Module) -> nn.Module | None:
    """The activation an MLP applies: its one parameter-free child, or an ``act_fn``-like attribute."""
    children = [c for c in mlp.children() if not any(True for _ in c.parameters())
                and not isinstance(c, (nn.Dropout, nn.Identity))]
    if len(children) == 1:
        return children[0]
    for name in _ACTIVATION_NAMES:
        fn = getattr(mlp, name, None)
        if callable(fn):
            return fn if isinstance(fn, nn.Module) else _Activation(fn)
    return None


@dataclass
class DenseMLP:
    """A dense MLP as plain tensors: ``out_proj @ act(...) + out_bias``.

    in_proj ``[N, H]`` (``N = 2 I`` when gated: gate rows, then up rows), in_bias ``[N]``,
    out_proj ``[H, I]``, out_bias ``[H]``.
    """

    in_proj: torch.Tensor
    in_bias: torch.Tensor | None
    out_proj: torch.Tensor
    out_bias: torch.Tensor | None
    act: nn.Module
    gated: bool

    @classmethod
    def from_module(cls, mlp: nn.Module, kind: MlpKind | None = None) -> "DenseMLP":
        """Read a dense MLP (any layout of ``DENSE_LAYOUTS``); ``kind``, when given, must be its kind."""
        layout = dense_layout(mlp)
        act = mlp_activation(mlp)
        if layout is None or act is None or (kind is not None and layout.kind != kind):
            found = "no activation" if layout is not None and act is None else f"layout {layout}"
            raise ValueError(f"{type(mlp).__name__} is not a dense {kind or 'MLP'} of a known form ({found}); "
                             f"known forms: {', '.join(str(l.in_names + (l.out_name,)) for l in DENSE_LAYOUTS)}")
        ins = [getattr(mlp, name) for name in layout.in_names]
        out = getattr(mlp, layout.out_name)
        in_bias = torch.cat([lin.bias for lin in ins]) if ins[0].bias is not None else None
        return cls(
            in_proj=torch.cat([_weight(lin) for lin in ins]),
            in_bias=in_bias,
            out_proj=_weight(out),
            out_bias=out.bias,
            act=act,
            gated=layout.kind != "plain",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dense MLP on ``x`` ``[..., H]`` -> ``[..., H]``, computed from these tensors."""
        hidden = nn.functional.linear(x, self.in_proj, self.in_bias)
        if self.gated:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = self.act(gate) * up
        else:
            hidden = self.act(hidden)
        return nn.functional.linear(hidden, self.out_proj, self.out_bias)

    @property
    def intermediate_size(self) -> int:
        return self.out_proj.shape[1]


def _expert_rows(dense: DenseMLP, num_experts: int) -> torch.Tensor:
    """``[E, N/E]`` row indices of ``in_proj`` owned by each expert under ``partition``.

    For a gated MLP an expert owns the same neurons in the gate half and in the up half.
    """
    size = dense.intermediate_size
    neurons = torch.arange(size).view(num_experts, size // num_experts)
    return torch.cat([neurons, neurons + size], dim=1) if dense.gated else neurons


class MoEExperts(nn.Module):
    """``E`` expert MLPs stored as 3D tensors; forward = grouped dispatch (see ``dispatch.py``)."""

    def __init__(self, in_proj, out_proj, in_bias, out_bias, act: nn.Module, gated: bool):
        super().__init__()
        self.gated = gated
        self.num_experts = in_proj.shape[0]
        self.backend: Backend = "auto"  # see dispatch.py; set on the instance to force one
        in_name = "gate_up_proj" if gated else "up_proj"
        self.in_name = in_name
        self.register_parameter(in_name, nn.Parameter(in_proj))
        self.down_proj = nn.Parameter(out_proj)
        self.register_parameter(f"{in_name}_bias", None if in_bias is None else nn.Parameter(in_bias))
        self.register_parameter("down_proj_bias", None if out_bias is None else nn.Parameter(out_bias))
        self.act_fn = act

    @classmethod
    def from_dense(
        cls, dense: DenseMLP, num_experts: int, init: Literal["copy", "partition"], noise: float = 0.0
    ) -> "MoEExperts":
        """Experts initialised from ``dense`` (see the module docstring); ``noise`` adds Gaussian
        noise of ``noise * std(W)`` to each expert weight matrix ``W`` (biases stay exact)."""
        with torch.no_grad():
            if init == "copy":
                in_proj = dense.in_proj.expand(num_experts, -1, -1).clone()
                out_proj = dense.out_proj.expand(num_experts, -1, -1).clone()
                in_bias = None if dense.in_bias is None else dense.in_bias.expand(num_experts, -1).clone()
            else:
                rows = _expert_rows(dense, num_experts).to(dense.in_proj.device)
                in_proj = dense.in_proj[rows]  # [E, N/E, H]
                neurons = rows[:, : dense.intermediate_size // num_experts]
                out_proj = (dense.out_proj[:, neurons].permute(1, 0, 2) * num_experts).contiguous()  # [E, H, I/E]
                in_bias = None if dense.in_bias is None else dense.in_bias[rows]
            out_bias = None if dense.out_bias is None else dense.out_bias.expand(num_experts, -1).clone()
            if noise > 0:
                for weight in (in_proj, out_proj):
                    weight.add_(torch.randn_like(weight) * (noise * weight.std()))
        return cls(in_proj, out_proj, in_bias, out_bias, dense.act, dense.gated)

    @property
    def in_proj(self) -> nn.Parameter:
        return getattr(self, self.in_name)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x ``[T, H]``, weights/indices ``[T, k]`` -> ``[T, H]``."""
        return experts_forward(
            x,
            weights,
            indices,
            self.in_proj,
            self.down_proj,
            self.act_fn,
            self.gated,
            in_bias=getattr(self, f"{self.in_name}_bias"),
            out_bias=self.down_proj_bias,
            backend=self.backend,
        )


class TopKRouter(nn.Module):
    """Linear router ``[E, H]``; forward returns (logits ``[T, E]``, weights ``[T, k]``, indices ``[T, k]``)."""

    def __init__(self, weight: torch.Tensor, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor):
        logits = nn.functional.linear(x, self.weight)
        return (logits, *route(logits, self.top_k))


class SparseMoeBlock(nn.Module):
    """Drop-in replacement for a dense MLP: ``[B, L, H] -> [B, L, H]``, each token through its top-k experts."""

    def __init__(self, gate: TopKRouter, experts: MoEExperts):
        super().__init__()
        self.gate = gate
        self.experts = experts

    @classmethod
    def from_dense(
        cls,
        mlp: nn.Module,
        kind: MlpKind | None,
        num_experts: int,
        top_k: int,
        init: Literal["copy", "partition"] = "copy",
        noise: float = 0.0,
        router_std: float = 0.02,
    ) -> "SparseMoeBlock":
        dense = DenseMLP.from_module(mlp, kind)
        hidden = dense.in_proj.shape[1]
        router = dense.in_proj.new_zeros(num_experts, hidden)
        if init == "copy":
            router.normal_(0.0, router_std)
        return cls(TopKRouter(router, top_k), MoEExperts.from_dense(dense, num_experts, init, noise))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, weights, indices = self.gate(flat)
        return self.experts(flat, weights, indices).view(shape)
