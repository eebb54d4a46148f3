"""Exact parameter counts from a model config, without building the model.

The memory lesson (01) starts from these counts: every byte of weights, gradients and optimizer
state is a parameter count times bytes per element. Both functions work on any Llama-family
``transformers`` config (``LlamaConfig`` and look-alikes such as TinyLlama's) and are tested against
the real thing: the model instantiated on the ``meta`` device, and peft's trainable count.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def linear_layer_parameters(config) -> int:
    """Weights of the decoder layers' linear projections (biases excluded): the only weights that
    ``BitsAndBytesConfig(load_in_4bit=True)`` stores in 4 bits. The embeddings, the LM head and the
    norms stay in 16 bits, so a 4-bit model's bytes are not ``count_parameters`` x 4 bits
    (``budget.model_bytes("nf4")`` counts both parts; ``tests/test_four_bit_bytes.py`` checks
    it against the tensors bitsandbytes stores)."""
    return config.num_hidden_layers * sum(n_in * n_out for n_in, n_out in linear_shapes(config).values())


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


# ----------------------------------------------------------------------------------------------
# Bytes


#: Bytes per stored value. NF4/INT4 pack two values per byte; their quantization constants are
#: extra (see ``nf4_bits_per_parameter``).
BYTES_PER_VALUE = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5,
                   "nf4": 0.5}
OPTIMIZERS = ("adamw", "adamw_8bit", "sgd", "sgd_momentum")
GB = 1e9  # the literature's GB are decimal


def parameter_numels(config) -> list[int]:
    """Element count of every parameter tensor of a Llama-family model, in model order."""
    shapes = linear_shapes(config)
    hidden = config.hidden_size
    numels = [config.vocab_size * hidden]
    for _ in range(config.num_hidden_layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            numels.append(shapes[name][0] * shapes[name][1])
            if getattr(config, "attention_bias", False):
                numels.append(shapes[name][1])
        for name in ("gate_proj", "up_proj", "down_proj"):
            numels.append(shapes[name][0] * shapes[name][1])
            if getattr(config, "mlp_bias", False):
                numels.append(shapes[name][1])
        numels += [hidden, hidden]  # input_layernorm, post_attention_layernorm
    numels.append(hidden)  # final norm
    if not getattr(config, "tie_word_embeddings", False):
        numels.append(config.vocab_size * hidden)
    return numels


def optimizer_state_bytes(tensor_numels, optimizer: str = "adamw", state_bytes: float = 4,
                          step_counter_bytes: float = 4, blocksize: int = 256,
                          min_8bit_size: int = 4096, quantile_map_bytes: int = 1024) -> float:
    """Bytes of optimizer state for trainable tensors with ``tensor_numels`` elements each.

    - ``adamw``: two moments of ``state_bytes`` per element (PyTorch: fp32), plus one step counter
      tensor per parameter tensor (PyTorch keeps a 0-d fp32 tensor: 4 bytes).
    - ``sgd``: nothing. ``sgd_momentum``: one buffer of ``state_bytes`` per element.
    - ``adamw_8bit`` (bitsandbytes, Dettmers et al. 2022, "8-bit Optimizers via Block-wise
      Quantization"): per tensor of at least ``min_8bit_size`` elements, each moment is one byte
      per element, an fp32 absmax per ``blocksize`` elements and a 256-entry fp32 quantile map;
      smaller tensors keep fp32 moments.
    """
    numels = list(tensor_numels)
    if optimizer == "adamw":
        return sum(2 * state_bytes * n for n in numels) + step_counter_bytes * len(numels)
    if optimizer == "sgd":
        return 0
    if optimizer == "sgd_momentum":
        return sum(state_bytes * n for n in numels)
    if optimizer == "adamw_8bit":
        total = 0
        for n in numels:
            if n >= min_8bit_size:
                total += 2 * (n + 4 * -(-n // blocksize) + quantile_map_bytes)
            else:
                total += 2 * 4 * n
        return total
    raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")


def nf4_bits_per_parameter(blocksize: int = 64, double_quant: bool = True,
                           second_blocksize: int = 256) -> float:
    """Storage bits per weight in NF4 (Dettmers et al. 2023, "QLoRA", section 3).

    4 bits per weight, plus one fp32 absmax per block of ``blocksize`` weights (32/64 = 0.5 bits);
    with double quantization the absmax are stored as 8 bits with one fp32 constant per
    ``second_blocksize`` of them: 8/64 + 32/(64*256) = 0.127 bits.
    """
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * second_blocksize)


def activation_bytes(config, batch_size: int, seq_len: int, activation_checkpointing: bool = False,
                     value_bytes: float = 4, stat_bytes: float = 4, label_bytes: int = 8) -> float:
    """Bytes of tensors a Llama causal LM saves for backward in one training forward pass.

    Counted from what ``transformers``' ``LlamaForCausalLM`` (SDPA attention, no dropout) saves,
    following the method of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
    Transformer Models", section 4), whose GPT formula ``sbh(34 + 5as/h)`` assumes 16-bit values,
    dropout masks and attention scores stored in full. Here, with ``b`` batch, ``s`` sequence,
    ``h`` hidden, ``kv`` key/value width, ``I`` intermediate, ``n`` heads, per layer:

    - 2 RMSNorms: input, normalized and scaled outputs (3 ``bsh``) and one ``bs`` statistic each;
    - attention: rotated queries and the output (2 ``bsh``), rotated keys and values
      (2 ``bs kv``), and SDPA's log-sum-exp (``b n s``, fp32); no ``s x s`` scores;
    - MLP: gate, up, activated gate and their product (4 ``bsI``);

    plus the final norm, the log-softmax of the logits (``bsV``, fp32), the labels, the loss's
    scalar normalizer and RoPE's cos/sin. With gradient checkpointing every layer keeps only its
    input (``bsh``) and recomputes the rest in backward (one layer's worth is alive again then).
    ``value_bytes`` is the activation dtype's size; the formula is exact for fp32 on the CPU
    (tests check) and an estimate for 16-bit training, where norms and softmax run partly in
    fp32.
    """
    b, s, h = batch_size, seq_len, config.hidden_size
    kv = linear_shapes(config)["k_proj"][1]
    n, d = config.num_attention_heads, head_dim(config)
    layers, intermediate, vocab = config.num_hidden_layers, config.intermediate_size, config.vocab_size
    head = value_bytes * 3 * b * s * h + stat_bytes * b * s  # final norm
    head += stat_bytes * b * s * vocab + 2 * label_bytes * b * s  # log-softmax, labels
    head += stat_bytes  # the loss's 0-d normalizer
    if activation_checkpointing:
        return layers * value_bytes * b * s * h + head
    per_layer = value_bytes * b * s * (8 * h + 2 * kv + 4 * intermediate)
    per_layer += stat_bytes * (2 * b * s + b * n * s)
    return layers * per_layer + head + 2 * value_bytes * s * d  # + RoPE cos and sin


@dataclass(frozen=True)
class MemoryEstimate:
    """Training memory per GPU, by component, in bytes."""

    weights: float
    gradients: float
    optimizer_states: float
    master_weights: float
    activations: float

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer_states + self.master_weights
                + self.activations)


def training_memory(n_params: int, trainable_params: int | None = None, *,
                    weight_bytes: float = 4, gradient_bytes: float = 4,
                    optimizer: str = "adamw", state_bytes: float = 4,
                    master_weight_bytes: float = 0, activation_bytes: float = 0,
                    trainable_tensor_numels=None, zero_stage: int = 0,
                    n_gpus: int = 1) -> MemoryEstimate:
    """Memory per GPU to train a model, every assumption a named argument.

    ``weight_bytes`` per stored weight (4 fp32, 2 fp16/bf16, ``nf4_bits_per_parameter()/8``);
    gradients of ``gradient_bytes`` and optimizer states (``optimizer_state_bytes``) only for the
    ``trainable_params`` (default: all); ``master_weight_bytes`` per trainable parameter for the
    fp32 copy that mixed-precision training updates (4, or 0 without one);
    ``trainable_tensor_numels`` (the element count of each trainable tensor) makes per-tensor
    optimizer overheads exact: step counters, 8-bit blocks; without it they are left out.

    ZeRO (Rajbhandari et al. 2020) shards over ``n_gpus``: stage 1 the optimizer states and master
    weights, stage 2 also the gradients, stage 3 also the weights. Activations are per GPU.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if n_gpus < 1:
        raise ValueError(f"n_gpus must be at least 1, got {n_gpus}")
    trainable = n_params if trainable_params is None else trainable_params
    if trainable_tensor_numels is None:
        states = optimizer_state_bytes([trainable], optimizer, state_bytes, step_counter_bytes=0)
    else:
        numels = list(trainable_tensor_numels)
        if sum(numels) != trainable:
            raise ValueError("trainable_tensor_numels must add up to trainable_params")
        states = optimizer_state_bytes(numels, optimizer, state_bytes)
    shard = lambda stage: n_gpus if zero_stage >= stage else 1
    return MemoryEstimate(
        weights=n_params * weight_bytes / shard(3),
        gradients=trainable * gradient_bytes / shard(2),
        optimizer_states=states / shard(1),
        master_weights=trainable * master_weight_bytes / shard(1),
        activations=activation_bytes)


def measured_static_bytes(model, optimizer) -> dict[str, int]:
    """Bytes actually held by parameters, gradients and optimizer state tensors right now."""
    def nbytes(t):
        return t.numel() * t.element_size()

    state = sum(nbytes(v) for s in optimizer.state.values() for v in s.values()
                if hasattr(v, "element_size"))
    return {"weights": sum(nbytes(p) for p in model.parameters()),
            "gradients": sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None),
            "optimizer_states": state}


def measured_activation_bytes(model, **batch) -> int:
    """Bytes of distinct tensors autograd saves for backward in one forward pass of ``model``.

    Uses ``torch.autograd.graph.saved_tensors_hooks``; a tensor counts once per storage, and
    parameters (saved by every linear layer) do not count: they are weights, not activations.
    """
    import torch

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    del loss
    return sum(storages.values())
