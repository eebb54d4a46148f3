"""Parameter-efficient fine-tuning methods written out in plain PyTorch.

Each module is short enough to read in one sitting and is tested against the library: LoRA and
(IA)^3 against peft with the same weights, the Houlsby adapter (which peft does not have) against
its identity-at-initialisation and its parameter-count formula.

- ``LoRALinear``: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".
- ``IA3Linear``: Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
  than In-Context Learning" ((IA)^3: Infused Adapter by Inhibiting and Amplifying Inner
  Activations).
- ``BottleneckAdapter`` and ``add_houlsby_adapters``: Houlsby et al. 2019, "Parameter-Efficient
  Transfer Learning for NLP".
- ``prefix_tuning_parameters``: Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
  Generation"; the size of peft's ``PrefixEncoder``, with and without its MLP (lesson 03; tested
  against peft's own count).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``y = W x + (B A x) * scaling``.

    ``A`` is ``r x in`` (Kaiming-uniform, as peft), ``B`` is ``out x r`` and starts at zero, so the
    wrapped layer starts out exactly equal to the base layer. ``scaling = alpha / r``, the LoRA
    paper's choice: with ``alpha`` fixed, the update's scale shrinks as ``r`` grows, so large ranks
    learn slowly. ``use_rslora`` scales by ``alpha / sqrt(r)`` instead, which keeps the update's
    scale stable across ranks (Kalajdzievski 2023, rsLoRA). Dropout applies to the input of the
    low-rank path only.
    ``merge()`` folds ``B A * scaling`` into ``W`` (no extra latency at inference);
    ``unmerge()`` takes it out again.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if r < 1:
            raise ValueError(f"r must be a positive integer, got {r}")
        self.base = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.r, self.alpha = r, alpha
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """``B @ A * scaling``: the ``out x in`` update LoRA adds to ``W``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        return out + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


class IA3Linear(nn.Module):
    """A frozen ``nn.Linear`` whose activations are rescaled by a learned vector ``l``.

    (IA)^3 multiplies keys and values by vectors (``scale="output"``: ``y = l * (W x)``) and the
    feed-forward's hidden activation by another (``scale="input"`` on ``down_proj``:
    ``y = W (l * x)``). ``l`` starts at ones, so the layer starts out equal to the base layer.
    """

    def __init__(self, base: nn.Linear, scale: str = "output"):
        super().__init__()
        if scale not in ("output", "input"):
            raise ValueError(f"scale must be 'output' or 'input', got {scale!r}")
        self.base, self.scale = base, scale
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        size = base.out_features if scale == "output" else base.in_features
        self.ia3_l = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == "input":
            return self.base(x * self.ia3_l)
        return self.base(x) * self.ia3_l


class BottleneckAdapter(nn.Module):
    """Houlsby's adapter: ``h + up(act(down(h)))`` with a ``bottleneck`` much smaller than ``h``.

    ``up`` starts at zero, so the adapter starts as the identity and the adapted model as the base
    model. Parameters: ``2 * hidden * bottleneck + bottleneck + hidden`` (weights and biases).
    """

    def __init__(self, hidden_size: int, bottleneck: int = 16, activation: nn.Module | None = None):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.activation = activation or nn.GELU()
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.activation(self.down(hidden)))


def adapter_parameters(hidden_size: int, bottleneck: int) -> int:
    """Parameters of one ``BottleneckAdapter``."""
    return 2 * hidden_size * bottleneck + bottleneck + hidden_size


class _AdaptedSublayer(nn.Module):
    """Runs a sublayer (attention or MLP), then an adapter on its output, before the residual."""

    def __init__(self, sublayer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.sublayer, self.adapter = sublayer, adapter

    def forward(self, *args, **kwargs):
        output = self.sublayer(*args, **kwargs)
        if isinstance(output, tuple):  # attention returns (output, attention weights)
            return (self.adapter(output[0]), *output[1:])
        return self.adapter(output)


def add_houlsby_adapters(model, bottleneck: int = 16) -> list[BottleneckAdapter]:
    """Insert a ``BottleneckAdapter`` after the attention and the MLP of every decoder layer of a
    Llama-style model, freeze everything else, and return the adapters (2 per layer).

    As in Houlsby et al. (Figure 2), each adapter transforms the sublayer's output before it is
    added to the residual stream.
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    hidden = model.config.hidden_size
    adapters = []
    for layer in model.model.layers:
        attention_adapter, mlp_adapter = (BottleneckAdapter(hidden, bottleneck) for _ in range(2))
        layer.self_attn = _AdaptedSublayer(layer.self_attn, attention_adapter)
        layer.mlp = _AdaptedSublayer(layer.mlp, mlp_adapter)
        adapters += [attention_adapter, mlp_adapter]
    return adapters


def prefix_tuning_parameters(n_virtual: int, kv_width: int, layers: int,
                             encoder_hidden: int | None = None) -> int:
    """Trainable parameters of prefix tuning as peft's ``PrefixEncoder`` builds it.

    Every layer gets ``n_virtual`` keys and ``n_virtual`` values of the key/value width
    (``kv_width`` = key/value heads x head dim), so the prefix is an ``n_virtual x (layers * 2 *
    kv_width)`` matrix. Without the reparameterisation (``encoder_hidden=None``) that matrix is what
    trains. With it, an ``n_virtual x kv_width`` embedding goes through ``Linear(kv_width,
    encoder_hidden)``, tanh and ``Linear(encoder_hidden, layers * 2 * kv_width)`` (weights and biases).
    """
    prefix_width = layers * 2 * kv_width
    if encoder_hidden is None:
        return n_virtual * prefix_width
    embedding = n_virtual * kv_width
    first_linear = kv_width * encoder_hidden + encoder_hidden
    second_linear = encoder_hidden * prefix_width + prefix_width
    return embedding + first_linear + second_linear
