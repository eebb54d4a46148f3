"""Load a profile's model and tokenizer: the local course model or a Hub id, optionally in 4-bit.

One function, ``load_model_and_tokenizer``, serves every lesson and both profiles. The code path
for a Hub id (TinyLlama) is the same ``from_pretrained`` call; the only Hub-specific step is
``ensure_chat_setup``, because TinyLlama's *base* checkpoint ships no chat template and no padding
token. Tests run that path on a local copy of the course model stripped the same way.

Also here, because every lesson that trains needs them: ``bnb_4bit_config`` /
``bnb_config_from_recipe`` (the quantization config), ``keep_cpu_4bit_weights_trainable`` (a
bitsandbytes CPU pitfall, lesson 07), ``trainable_in_fp32`` and ``trainable_in_fp32_under_fp16``
(what fp16 mixed precision needs of trainable weights), ``autocast_like`` (a 16-bit model with
fp32 parts, outside a trainer), ``parameter_count`` (weights counted as a 4-bit model holds them)
and ``release`` (a model's GPU memory given back).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from course_utils.course.chat import TINYLLAMA_CHAT_TEMPLATE

if TYPE_CHECKING:  # for annotations only: profiles -> rehearsal -> models
    from course_utils.course.profiles import Profile


class FourBitUnavailableError(RuntimeError):
    """4-bit NF4 was asked for on a machine where bitsandbytes cannot run it."""


def check_4bit_support(device: str) -> None:
    """Quantize a small tensor with bitsandbytes on ``device``; raise a clear error if it fails.

    bitsandbytes runs NF4 on CUDA and, since 0.45, on x86/ARM CPUs. Elsewhere (an unsupported
    accelerator, a missing native library) it fails deep inside the library; this turns that into
    ``FourBitUnavailableError`` with what to do instead.
    """
    try:
        import bitsandbytes.functional as bnb_functional

        probe = torch.linspace(-1, 1, 64, device=device)
        packed, _ = bnb_functional.quantize_4bit(probe, blocksize=64, quant_type="nf4")
        if packed.numel() != 32:
            raise RuntimeError(f"unexpected packed size {packed.numel()}")
    except Exception as error:  # any failure inside bitsandbytes means "no 4-bit here"
        raise FourBitUnavailableError(
            f"4-bit NF4 (bitsandbytes) does not work on device '{device}' on this machine "
            f"({type(error).__name__}: {error}). Load the model unquantized with "
            "load_in_4bit=False, or run on a CUDA GPU (the 'colab' profile).") from error


def bnb_4bit_config(compute_dtype: torch.dtype, quant_type: str = "nf4",
                    double_quant: bool = True):
    """QLoRA's quantization settings: NF4 weights, double quantization, ``compute_dtype`` matmuls.

    bitsandbytes defaults to fp4, so ``bnb_4bit_quant_type="nf4"`` must be explicit; lesson 06
    passes ``quant_type="fp4"`` and ``double_quant=False`` to compare.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def bnb_config_from_recipe(recipe):
    """``BitsAndBytesConfig`` from a recipe's ``quantization`` section, computing in the recipe's
    precision; ``None`` when the section is ``null`` or says ``load_in_4bit: false``."""
    from transformers import BitsAndBytesConfig

    quantization = recipe.values.get("quantization")
    if not quantization or not quantization["load_in_4bit"]:
        return None
    return BitsAndBytesConfig(**quantization, bnb_4bit_compute_dtype=recipe.torch_dtype())


def keep_cpu_4bit_weights_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns how
    many layers were switched.

    bitsandbytes 0.50 on CPUs with AVX512-BF16 rewrites a ``Linear4bit`` weight in place into
    another memory layout on the first forward pass without gradients (evaluation, generation)
    and from then on sends every forward, training included, through its inference kernel:
    outputs change and a QLoRA run trained afterwards learns against the wrong base (lesson 07
    measured it). This undoes any packing already done and turns the fast path off.
    """
    import bitsandbytes as bnb
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

    switched = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = (
                    _convert_weight_packed_for_cpu_inverse(module.weight.data, state))
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def ensure_chat_setup(tokenizer):
    """Give a tokenizer TinyLlama-Chat's template and ``</s>`` as padding when it has neither.

    TinyLlama's base checkpoint has no chat template and no pad token; the chat checkpoint and
    the course model have both. Returns the same tokenizer.
    """
    if not tokenizer.chat_template:
        tokenizer.chat_template = TINYLLAMA_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def process_device(profile: Profile):
    """Where this process keeps a quantized model: the CPU, or this process's own GPU. Under
    ``accelerate launch`` / ``torchrun`` every process has a ``LOCAL_RANK`` and must load onto
    ``cuda:LOCAL_RANK``; ``{"": 0}`` would put every copy on GPU 0."""
    import os

    if profile.device == "cpu":
        return "cpu"
    return int(os.environ.get("LOCAL_RANK", "0"))


def check_local_model(model_name_or_path: str | Path) -> None:
    """Raise ``FileNotFoundError`` with a fix when a local-looking path holds no model.

    Absolute and ``./``-relative paths are local; anything else is treated as a Hub id.
    """
    local = Path(str(model_name_or_path))
    if (local.is_absolute() or str(model_name_or_path).startswith(".")) and not (
            local / "config.json").exists():
        raise FileNotFoundError(missing_model_message(local))


def load_tokenizer(model_name_or_path: str | Path):
    """The tokenizer of a local folder or Hub id, with the chat setup ensured."""
    from transformers import AutoTokenizer

    check_local_model(model_name_or_path)
    return ensure_chat_setup(AutoTokenizer.from_pretrained(str(model_name_or_path)))


def missing_model_message(path: Path) -> str:
    return (f"no model at {path}. The course model ships in data/course-model/; if it is missing, "
            "your checkout is incomplete (git status) or rebuild it with "
            "`python -m course_utils.builds.course_model`.")


def load_model_and_tokenizer(profile: Profile, load_in_4bit: bool | None = None,
                             model_name_or_path: str | Path | None = None,
                             quantization_config=None):
    """Load ``(model, tokenizer)`` for ``profile``.

    ``load_in_4bit`` defaults to the profile's setting; ``True`` quantizes every linear layer but
    the LM head to NF4 through ``BitsAndBytesConfig`` (after checking that bitsandbytes works
    here). ``model_name_or_path`` overrides the profile's model (a local folder such as a saved
    SFT model, or a Hub id); ``quantization_config`` replaces QLoRA's ``bnb_4bit_config`` (and
    implies 4-bit). Weights are in ``profile.compute_dtype``; the model is in eval mode.
    """
    from transformers import AutoModelForCausalLM

    source = model_name_or_path or profile.model_name_or_path
    check_local_model(source)
    quantize = profile.load_in_4bit if load_in_4bit is None else load_in_4bit
    quantize = quantize or quantization_config is not None
    kwargs = {"dtype": profile.compute_dtype}
    if quantize:
        check_4bit_support(profile.device)
        kwargs["quantization_config"] = quantization_config or bnb_4bit_config(
            profile.compute_dtype)
        kwargs["device_map"] = {"": process_device(profile)}
    model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    if not quantize:
        model.to(profile.device)
    model.eval()
    return model, load_tokenizer(source)



def tinyllama_config():
    """TinyLlama-1.1B's ``LlamaConfig``, from the values in its ``config.json`` (no download).

    Shared by ``TinyLlama-1.1B-intermediate-step-1431k-3T`` and ``TinyLlama-1.1B-Chat-v1.0``.
    Instantiate it on the meta device to count parameters or inspect shapes without weights.
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def release(*models) -> None:
    """Give the GPU memory of ``models`` back: each moves to the CPU (where a notebook can still
    read it) and the CUDA cache is emptied. Lessons 09-11 call it once a model is measured, so no
    more 1.1B models are alive on a T4 than the course budget counts (``course_utils.budget``).
    A no-op for models already on the CPU."""
    import gc

    for model in models:
        if any(p.device.type == "cuda" for p in model.parameters()):
            model.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trainable_in_fp32(model) -> int:
    """Cast every trainable parameter to fp32; return how many were cast.

    fp16 mixed precision keeps the weights it updates in fp32: the gradient scaler refuses fp16
    gradients ("Attempting to unscale FP16 gradients"). peft upcasts LoRA's matrices itself, but
    not the trainable copy of a ``modules_to_save`` layer (the reward model's new ``score`` head),
    which stays in the fp16 the model was loaded in.
    """
    cast = 0
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()
            cast += 1
    return cast


def trainable_in_fp32_under_fp16(trainer) -> int:
    """Before ``trainer.train()``: when the trainer computes in fp16 mixed precision (a T4), cast its
    model's trainable weights to fp32 (``trainable_in_fp32``); return how many were cast.

    trl 1.16's ``SFTTrainer``, ``DPOTrainer`` and ``GRPOTrainer`` store a 4-bit model's adapters in
    bf16 whatever the precision flags say (the QLoRA paper's choice, right on a bf16 GPU). Under
    ``fp16=True`` accelerate unscales the gradients with CUDA's
    ``_amp_foreach_non_finite_check_and_unscale_cuda``, which has no bf16 kernel: the first
    optimizer step raises ``NotImplementedError``. (The CPU's kernel accepts bf16, which is why only
    the rehearsal's T4 scaler, ``course.rehearsal``, sees it off a GPU.) On the CPU in fp32 and on
    bf16 GPUs nothing is cast."""
    return trainable_in_fp32(trainer.model) if trainer.args.fp16 else 0


def autocast_like(model):
    """``torch.autocast`` in ``model``'s 16-bit dtype on its device, off for an fp32 model: for
    forward passes outside a trainer (which autocasts inside ``train()`` only) over a 16-bit model
    with fp32 trainable parts, such as the reward model's ``score`` head (``trainable_in_fp32``):
    without it, fp16 hidden states meet fp32 weights and the matmul refuses the mix."""
    embedding = model.get_input_embeddings().weight
    dtype = embedding.dtype if embedding.dtype in (torch.float16, torch.bfloat16) else None
    return torch.autocast(embedding.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def parameter_count(model, trainable_only: bool = False) -> int:
    """How many weights ``model`` holds (or trains), counting a 4-bit layer's packed storage as the
    weights it encodes: bitsandbytes packs two 4-bit weights into each byte of a ``Params4bit``,
    so its ``numel()`` is half the layer's weights (a quarter with 16-bit storage). The same rule
    as peft's ``get_nb_trainable_parameters``; ``sum(p.numel() ...)`` undercounts a QLoRA model."""
    total = 0
    for parameter in model.parameters():
        if trainable_only and not parameter.requires_grad:
            continue
        count = parameter.numel()
        if parameter.__class__.__name__ == "Params4bit":
            count *= 2 * parameter.element_size()
        total += count
    return total
