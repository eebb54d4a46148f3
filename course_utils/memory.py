"""Exact parameter counts from a model config, without building the model.

The memory lesson (01) starts from these counts: every byte of weights, gradients and optimizer
state is a parameter count times bytes per element. Both functions work on any Llama-family
``transformers`` config (``LlamaConfig`` and look-alikes such as TinyLlama's) and are tested against
the real thing: the model instantiated on the ``meta`` device, and peft's trainable count.
"""

from __future__ import annotations

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def head_dim(config) -> int:
    """Width of one attention head: ``config.head_dim`` when set, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of each of a decoder layer's seven linear projections.

    With grouped-query attention, ``k_proj`` and ``v_proj`` produce only
    ``num_key_value_heads * head_dim`` features: several query heads share one key/value head.
    """
    hidden, intermediate = config.hidden_size, config.intermediate_size
    q_width = config.num_attention_heads * head_dim(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv_width = kv_heads * head_dim(config)
    return {
        "q_proj": (hidden, q_width), "k_proj": (hidden, kv_width), "v_proj": (hidden, kv_width),
        "o_proj": (q_width, hidden), "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden),
    }


def count_parameters(config) -> int:
    """Parameters of a Llama-family causal LM: embeddings, layers, final norm and LM head.

    Per layer: the seven projections (with biases when ``attention_bias`` / ``mlp_bias``) and two
    RMSNorm weight vectors. The LM head adds ``vocab_size * hidden_size`` unless it is tied to the
    input embeddings (``tie_word_embeddings``).
    """
    shapes = linear_shapes(config)
    weights = sum(n_in * n_out for n_in, n_out in shapes.values())
    biases = 0
    if getattr(config, "attention_bias", False):
        biases += sum(shapes[n][1] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    if getattr(config, "mlp_bias", False):
        biases += sum(shapes[n][1] for n in ("gate_proj", "up_proj", "down_proj"))
    per_layer = weights + biases + 2 * config.hidden_size
    embeddings = config.vocab_size * config.hidden_size
    head = 0 if getattr(config, "tie_word_embeddings", False) else embeddings
    return embeddings + config.num_hidden_layers * per_layer + config.hidden_size + head


def lora_parameters(config, r: int, target_modules) -> int:
    """Trainable parameters of LoRA with rank ``r`` on ``target_modules`` in every layer.

    Each adapted ``Linear(in, out)`` gets ``A`` (``r x in``) and ``B`` (``out x r``): ``r * (in +
    out)`` parameters (Hu et al., 2021, "LoRA", section 4).
    """
    targets = list(target_modules)
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        raise ValueError(f"unknown target modules {unknown}; choose from {', '.join(LORA_TARGETS)}")
    if r < 1:
        raise ValueError(f"the LoRA rank must be a positive integer, got {r}")
    shapes = linear_shapes(config)
    per_layer = sum(r * (shapes[name][0] + shapes[name][1]) for name in set(targets))
    return config.num_hidden_layers * per_layer
