"""GPU memory of a training or scoring step traced at full scale on a machine without a GPU.

torch's ``FakeTensorMode`` runs the real modules (transformers' Llama, peft's LoRA layers,
bitsandbytes' 4-bit matmul through the fake kernels it registers, torch's AdamW) on tensors that
have shapes, dtypes and sizes but no storage, so a step of TinyLlama-1.1B with its 32,000-token
vocabulary costs seconds and no memory; ``torch.distributed._tools.mem_tracker.MemTracker``
records the peak bytes alive by parameters, gradients, optimizer states, activations and
temporaries. ``course_utils.budget.trace_phases`` builds every colab phase of lessons 07-11 with it.

What a trace is and is not, on this torch (CPU build):

- the tensors are fake **CPU** tensors: autograd on fake CUDA tensors aborts in a build without
  CUDA, and CUDA autocast switches itself off there. Their bytes are the bytes a T4 holds; the step
  runs under CPU fp16 autocast, whose list of ops cast to fp16 matches CUDA's for the matmuls;
  attention takes the CPU's fused kernel, which saves for backward what CUDA's memory-efficient
  kernel (a T4 has no FlashAttention) saves: the output and one log-sum-exp per row;
- it counts tensors, not the CUDA context or the caching allocator's slack
  (``course_utils.budget.CUDA_CONTEXT_GB`` adds them);
- dropout runs as CUDA's fused kernel (a one-byte mask), not the CPU's (a mask in the input's
  dtype), and trl's fused LM head as its Triton kernels (no fp32 copies of a logits tile), not as
  its CPU fallback. One step of that head cannot run under fake tensors: on a GPU it first picks
  the positions that are scored (``hidden_states[mask]``, a shape that depends on the data), so
  the trace scores every position, as trl does off a GPU: a little more than a T4 holds;
- the trainers' loops (data loading, logging, trl's collators) do not run under fake tensors: a
  phase traces the step those loops call, with the recipe's batch and lengths.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

#: rows of an NF4 block and of the second-level block of double quantization (bitsandbytes' defaults)
NF4_BLOCK, NESTED_BLOCK = 64, 256


class _NoHook:
    def remove(self) -> None:
        pass


@contextmanager
def fake_tensors():
    """``FakeTensorMode``, with dropout and trl's fused LM head run as on CUDA
    (``kernels_as_on_cuda``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with kernels_as_on_cuda(), FakeTensorMode(allow_non_fake_inputs=True):
        yield


@contextmanager
def kernels_as_on_cuda():
    """Dropout and trl's fused LM head with CUDA's memory behaviour on a CPU (fake tensors, or the
    CPU run of the GPU check's phases): ``_dropout_as_on_cuda`` and the stand-ins below."""
    from trl.kernels import chunked_logprob

    dropout = torch.nn.functional.dropout
    kernels = {name: getattr(chunked_logprob, name)
               for name in ("_forward_tile", "_backward_tile", "_addmm_fp32")}
    torch.nn.functional.dropout = _dropout_as_on_cuda
    chunked_logprob._forward_tile = _fused_forward_as_on_cuda
    chunked_logprob._backward_tile = _fused_backward_as_on_cuda
    chunked_logprob._addmm_fp32 = _addmm_as_on_cuda
    try:
        yield
    finally:
        torch.nn.functional.dropout = dropout
        for name, kernel in kernels.items():
            setattr(chunked_logprob, name, kernel)


# trl's fused LM head (``trl.kernels.chunked_logprob``) folds each [4,096 tokens x 32,768 entries]
# tile of logits into per-token sums with Triton kernels on a GPU, which write only those sums (and,
# in backward, the tile's gradient into the tile); their torch fallback for CPUs holds several fp32
# copies of the tile. Under fake tensors these stand-ins touch memory as the kernels do.

def _fused_forward_as_on_cuda(tile, tile_stride, targets, running_max, sum_exp, *args, **kwargs):
    sum_exp.add_(tile.amax(-1))


def _fused_backward_as_on_cuda(tile, *args, **kwargs):
    tile.mul_(1)


def _addmm_as_on_cuda(acc, a, b):
    acc.add_(torch.mm(a, b))  # CUDA: addmm(..., out_dtype=torch.float32, out=acc), no copy at all


@contextmanager
def _hooks_on_frozen_parameters_ignored():
    """``MemTracker`` hooks every parameter of a tracked module; a frozen base model's refuse."""
    hook, post_hook = torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook
    torch.Tensor.register_hook = lambda self, fn: hook(self, fn) if self.requires_grad else _NoHook()
    torch.Tensor.register_post_accumulate_grad_hook = (
        lambda self, fn: post_hook(self, fn) if self.requires_grad else _NoHook())
    try:
        yield
    finally:
        torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook = hook, post_hook


def _dropout_as_on_cuda(input, p=0.5, training=True, inplace=False):
    """CUDA's fused dropout (``native_dropout``), which keeps a one-byte mask for backward; the
    CPU's eager dropout keeps the mask in the input's dtype (four bytes in peft's fp32 LoRA path)."""
    if not training or p == 0:
        return input
    return torch.native_dropout(input, p, True)[0]


def meta_model(config, head: str = "causal", dtype: torch.dtype = torch.float16, nf4: bool = False):
    """TinyLlama (``config``) on the meta device in ``dtype``, as ``from_pretrained`` loads it: with
    the LM head (``causal``) or a one-output ``score`` head (``reward``), and with every linear
    layer of the decoder in bitsandbytes' ``Linear4bit`` when ``nf4`` (the LM head stays 16-bit, as
    ``BitsAndBytesConfig`` leaves it)."""
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            if head == "causal":
                model = LlamaForCausalLM(config)
            else:
                settings = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
                config = type(config)(**{**settings, "num_labels": 1, "pad_token_id": 0})
                model = LlamaForSequenceClassification(config)
            if nf4:
                for layer in model.model.layers:
                    for parent in (layer.self_attn, layer.mlp):
                        for name, child in list(parent.named_children()):
                            if isinstance(child, torch.nn.Linear):
                                setattr(parent, name, bnb.nn.Linear4bit(
                                    child.in_features, child.out_features, bias=False,
                                    compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                    device="meta"))
                model.is_loaded_in_4bit = True
    finally:
        torch.set_default_dtype(default)
    return model


def _fake_nf4_weight(module, name, parameter, dtype, device=None):
    """The weight of a ``Linear4bit`` as bitsandbytes stores it after quantizing: two weights per
    byte, one 8-bit absmax per 64 weights (double quantization) and one fp32 absmax per 256 of
    those, with the ``quant_state`` its matmul reads. (A fake tensor cannot become a
    ``Params4bit``; the layer's forward needs only the data and ``quant_state``.) The absmax
    tensors are registered as buffers of ``module``, so that the trace counts them."""
    from bitsandbytes.functional import QuantState

    shape = parameter.shape
    n = shape.numel()
    nested = QuantState(absmax=_tensor((-(-n // NF4_BLOCK // NESTED_BLOCK),), torch.float32, device),
                        code=_tensor((256,), torch.float32, device), blocksize=NESTED_BLOCK,
                        dtype=torch.float32)
    state = QuantState(absmax=_tensor((n // NF4_BLOCK,), torch.uint8, device), shape=shape,
                       code=_tensor((16,), torch.float32, device), blocksize=NF4_BLOCK,
                       quant_type="nf4", dtype=dtype, offset=_tensor((), torch.float32, device),
                       state2=nested)
    module.register_buffer(f"{name}_absmax", state.absmax)
    module.register_buffer(f"{name}_nested_absmax", nested.absmax)
    weight = torch.nn.Parameter(_tensor((n // 2, 1), torch.uint8, device), requires_grad=False)
    for key, value in {"quant_state": state, "quant_type": "nf4", "blocksize": NF4_BLOCK,
                       "compress_statistics": True, "bnb_quantized": True,
                       "quant_storage": torch.uint8, "module": module}.items():
        setattr(weight, key, value)
    return weight


def _tensor(shape, dtype, device):
    """Inside ``fake_tensors()`` (``device`` None) a fake tensor; on a real device random values (a
    GPU run, ``scripts/t4_check.py``): no NaN from uninitialised memory reaches a kernel."""
    if device is None:
        return torch.empty(shape, dtype=dtype)
    if dtype.is_floating_point:
        return torch.empty(shape, dtype=dtype, device=device).normal_(0, 0.02)
    return torch.randint(0, 256, shape, dtype=dtype, device=device)


def materialize(model, compute_dtype: torch.dtype = torch.float16, device=None):
    """Give every parameter and buffer of a meta-device ``model`` a tensor of its shape and dtype (a
    4-bit layer's weight as bitsandbytes stores it): fake tensors inside ``fake_tensors()``, or
    random ones on ``device`` (buffers such as RoPE's frequencies zero: what is measured is memory
    and time, not what the model says)."""
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None:
                continue
            if parameter.__class__.__name__ == "Params4bit":
                module._parameters[name] = _fake_nf4_weight(module, name, parameter, compute_dtype,
                                                             device)
            else:
                module._parameters[name] = torch.nn.Parameter(
                    _tensor(parameter.shape, parameter.dtype, device),
                    requires_grad=parameter.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type == "meta":
                module._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype, device=device)
    return model


_active: list = []


def device_peak_bytes(resident, step, optimizer=None) -> dict:
    """``peak_bytes`` for real tensors: on a GPU from its caching allocator (``total``: the most
    allocated during ``step``, the resident models included; ``reserved``: what the allocator held,
    fragmentation included); on the CPU with ``MemTracker``, as for fake tensors."""
    device = next(resident[0].parameters()).device
    if device.type != "cuda":
        return peak_bytes(resident, step, optimizer)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return {"total": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}


def peak_bytes(resident, step, optimizer=None) -> dict:
    """Run ``step()`` under ``MemTracker`` with the models in ``resident`` (and ``optimizer``'s
    states) tracked; return the peak bytes: ``total`` and its parts (``parameters``, ``gradients``,
    ``optimizer``, ``activations``, ``temporaries``, ``buffers``, ``other``)."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class PeakOnly(MemTracker):
        """The whole step's peak only: MemTracker also keeps every module's own peak, walking all of
        them at every op, which makes a 22-layer step quadratic in its length."""

        def _pre_fw_hook(self, module, inputs) -> None:
            # a module called again in one step (the reference pass with the adapter off, a second
            # micro-batch): MemTracker refuses repeated calls; per-module statistics are not kept
            # here, so its statistics start afresh
            try:
                super()._pre_fw_hook(module, inputs)
            except NotImplementedError:
                self.memory_tracking.pop(module, None)
                super()._pre_fw_hook(module, inputs)

        def _update_peak_stats(self, peak_state) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot["Total"]:
                    self._peak_mem[device] = snapshot["Total"]
                    self._peak_mem_snap[device] = dict(snapshot)

    tracker = PeakOnly()
    with _hooks_on_frozen_parameters_ignored():
        tracker.track_external(*resident, *([optimizer] if optimizer is not None else []))
    _active.append(tracker)
    try:
        with _hooks_on_frozen_parameters_ignored(), tracker:
            step()
    finally:
        _active.pop()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    names = {_MemRefType.PARAM: "parameters", _MemRefType.GRAD: "gradients",
             _MemRefType.OPT: "optimizer", _MemRefType.ACT: "activations",
             _MemRefType.TEMP: "temporaries", _MemRefType.BUFFER: "buffers",
             _MemRefType.OTH: "other"}
    result = {names[kind]: value for kind, value in peak.items() if kind in names}
    result["total"] = peak["Total"]
    return result


def layer_bytes_per_token(model, residual_dtype: torch.dtype, autocast: bool, tokens: int = 256,
                          grad: bool = True) -> dict:
    """Activation bytes per token of the first decoder layer of a materialized ``model``: ``saved``
    (what its forward keeps for backward) and ``peak`` (the most alive during its forward and
    backward; its forward alone without ``grad``), for ``tokens`` tokens of a residual stream in
    ``residual_dtype``. Call inside ``fake_tensors()``."""
    from torch.distributed._tools.mem_tracker import _MemRefType

    decoder = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    layer, rotary = decoder.layers[0], decoder.rotary_emb
    hidden = torch.empty(1, tokens, model.config.hidden_size, dtype=residual_dtype, requires_grad=grad)
    positions = torch.arange(tokens)[None]
    saved = {}

    def activations(tracker) -> float:
        snapshot = tracker.get_tracker_snapshot()[torch.device("cpu")]
        return snapshot.get(_MemRefType.ACT, 0) + snapshot.get(_MemRefType.TEMP, 0)

    def step():
        tracker = _active[-1]
        before = activations(tracker)
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast), torch.set_grad_enabled(grad):
            output = layer(hidden, position_embeddings=rotary(hidden, positions), position_ids=positions)
        output = output[0] if isinstance(output, tuple) else output
        saved["bytes"] = activations(tracker) - before - output.numel() * output.element_size()
        if grad:
            output.float().sum().backward()

    peak = peak_bytes([model], step)
    parameters = sum(peak.get(kind, 0) for kind in ("parameters", "buffers", "gradients", "optimizer"))
    input_bytes = hidden.numel() * hidden.element_size()
    return {"saved": saved["bytes"] / tokens, "peak": (peak["total"] - parameters - input_bytes) / tokens}
