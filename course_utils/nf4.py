"""Number formats and 4-bit NormalFloat (NF4) quantization, written out in plain torch.

Lesson 06 builds QLoRA's storage format from nothing and checks every step against
bitsandbytes, byte for byte:

- ``FloatFormat`` / ``FORMATS``: FP32, TF32, FP16, BF16 and FP8 (E4M3, E5M2) as sign, exponent
  and mantissa bits; ``encode`` rounds a real number into a format (round to nearest, ties to
  even) and shows its bits;
- ``absmax_quantize`` / ``blockwise_absmax_quantize``: INT8/INT4 absmax quantization, per tensor
  and per block;
- ``build_nf4_code``: the 16 NF4 values from quantiles of the standard normal distribution
  (Dettmers et al. 2023, "QLoRA", section 3 and appendix E); ``NF4_CODE`` is the table;
- ``quantize_nf4`` / ``dequantize_nf4``: blockwise NF4 with two codes per byte, the same bytes as
  ``bitsandbytes.functional.quantize_4bit(x, quant_type="nf4")``;
- ``create_dynamic_map`` / ``double_quantize`` / ``double_dequantize``: QLoRA's double
  quantization of the per-block constants (8-bit dynamic code, blocks of 256, mean offset);
- ``storage_bits_per_parameter``: bits per weight counted from the stored tensors;
- ``level_usage`` / ``bits_of_information``: how evenly a 4-bit code's levels are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The NF4 table as bitsandbytes ships it (bitsandbytes/functional.py, ``get_4bit_type``) and as
# the QLoRA paper lists it (appendix E). ``build_nf4_code()`` derives it; a test compares the two.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

NF4_ZERO_INDEX = 7  # an odd count is padded with a zero, as bitsandbytes does
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- number formats ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: 1 sign bit, ``exponent_bits``, ``mantissa_bits``.

    ``ieee_specials``: the all-ones exponent is reserved for infinities and NaN (FP32, FP16,
    BF16, TF32, FP8 E5M2). FP8 E4M3 ("fn": finite) has no infinities and uses the all-ones
    exponent for numbers too, except mantissa all ones, which is NaN; its largest value is 448.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    ieee_specials: bool = True

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        top = 2 ** self.exponent_bits - 1
        return (top - 1 if self.ieee_specials else top) - self.bias

    @property
    def max(self) -> float:
        """Largest finite value."""
        mantissa_steps = 2 ** self.mantissa_bits - (1 if self.ieee_specials else 2)
        return 2.0 ** self.max_exponent * (1 + mantissa_steps / 2 ** self.mantissa_bits)

    @property
    def smallest_normal(self) -> float:
        return 2.0 ** self.min_exponent

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.min_exponent - self.mantissa_bits)

    @property
    def eps(self) -> float:
        """Gap between 1 and the next larger number: the relative precision."""
        return 2.0 ** -self.mantissa_bits

    @property
    def decimal_digits(self) -> float:
        """Significant decimal digits the mantissa carries: (mantissa bits + 1) x log10(2)."""
        return (self.mantissa_bits + 1) * math.log10(2)


FORMATS = {
    "fp32": FloatFormat("fp32", 8, 23),
    "tf32": FloatFormat("tf32", 8, 10),
    "fp16": FloatFormat("fp16", 5, 10),
    "bf16": FloatFormat("bf16", 8, 7),
    "fp8_e4m3": FloatFormat("fp8_e4m3", 4, 3, ieee_specials=False),
    "fp8_e5m2": FloatFormat("fp8_e5m2", 5, 2),
}


@dataclass(frozen=True)
class EncodedFloat:
    """A number rounded into a format: its bit fields and the value they decode to."""

    format: FloatFormat
    sign: str
    exponent: str
    mantissa: str
    value: float

    @property
    def bits(self) -> str:
        return f"{self.sign} {self.exponent} {self.mantissa}"

    def explain(self) -> str:
        """The decoding written out, e.g. ``(-1)^0 x 2^(128-127) x (1 + 4788187/2^23)``."""
        fmt, e, m = self.format, int(self.exponent, 2), int(self.mantissa, 2)
        if e == 0:
            return (f"(-1)^{self.sign} x 2^({fmt.min_exponent}) x ({m}/2^{fmt.mantissa_bits})"
                    " (subnormal)")
        return f"(-1)^{self.sign} x 2^({e}-{fmt.bias}) x (1 + {m}/2^{fmt.mantissa_bits})"


def encode(value: float, fmt: FloatFormat | str) -> EncodedFloat:
    """Round ``value`` to the nearest number of ``fmt`` (ties to even) and return its bits.

    Values beyond the largest finite number raise ``OverflowError`` (hardware would give
    infinity or NaN, or saturate, depending on the format and the conversion).
    """
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"encode() takes a finite number, got {value}")
    sign = "1" if math.copysign(1.0, value) < 0 else "0"
    magnitude = abs(value)
    m = fmt.mantissa_bits
    if magnitude == 0:
        return EncodedFloat(fmt, sign, "0" * fmt.exponent_bits, "0" * m, math.copysign(0.0, value))
    exponent = max(math.frexp(magnitude)[1] - 1, fmt.min_exponent)
    quantum = 2.0 ** (exponent - m)
    steps = round(magnitude / quantum)  # Python rounds exact halves to even
    rounded = steps * quantum
    if rounded > fmt.max:
        raise OverflowError(f"{value} is beyond {fmt.name}'s largest finite value {fmt.max}")
    if rounded == 0:
        return EncodedFloat(fmt, sign, "0" * fmt.exponent_bits, "0" * m, math.copysign(0.0, value))
    if rounded < fmt.smallest_normal:
        exponent_field, mantissa_field = 0, steps
    else:
        exponent = math.frexp(rounded)[1] - 1
        exponent_field = exponent + fmt.bias
        mantissa_field = int(rounded / 2.0 ** (exponent - m)) - 2 ** m
    return EncodedFloat(fmt, sign, format(exponent_field, f"0{fmt.exponent_bits}b"),
                        format(mantissa_field, f"0{m}b"), math.copysign(rounded, value))


def decode(sign: str, exponent: str, mantissa: str, fmt: FloatFormat | str) -> float:
    """The value of a bit pattern (finite numbers only)."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    e, m = int(exponent, 2), int(mantissa, 2)
    scale = -1.0 if sign == "1" else 1.0
    if e == 0:
        return scale * 2.0 ** fmt.min_exponent * m / 2 ** fmt.mantissa_bits
    return scale * 2.0 ** (e - fmt.bias) * (1 + m / 2 ** fmt.mantissa_bits)


def int8_bits(value: float, scale: float) -> tuple[int, str, float]:
    """INT8 with a scale: the integer ``round(value / scale)`` clipped to [-127, 127], its two's
    complement bits, and the value it stands for."""
    q = max(-127, min(127, round(value / scale)))
    return q, format(q & 0xFF, "08b"), q * scale


# --- absmax quantization -----------------------------------------------------------------------

def absmax_quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization of a whole tensor: ``q = round(x * qmax / absmax(x))``.

    Returns the integers (int8; values in [-qmax, qmax] with ``qmax = 2^(bits-1) - 1``) and the
    fp32 scale ``absmax / qmax`` to multiply them by. One large value sets the scale for all.
    """
    qmax = 2 ** (bits - 1) - 1
    scale = x.float().abs().max().clamp(min=1e-38) / qmax
    return torch.round(x.float() / scale).to(torch.int8), scale


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def blockwise_absmax_quantize(x: torch.Tensor, bits: int = 8, blocksize: int = 64
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantization per block of ``blocksize`` consecutive values (the flattened tensor's
    size must be a multiple of ``blocksize``). Returns int8 codes shaped ``(blocks, blocksize)``
    and one fp32 scale per block."""
    flat = x.float().reshape(-1)
    if flat.numel() % blocksize:
        raise ValueError(f"size {flat.numel()} is not a multiple of the block size {blocksize}")
    blocks = flat.reshape(-1, blocksize)
    qmax = 2 ** (bits - 1) - 1
    scales = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38) / qmax
    return torch.round(blocks / scales).to(torch.int8), scales.squeeze(1)


def blockwise_absmax_dequantize(q: torch.Tensor, scales: torch.Tensor, shape) -> torch.Tensor:
    return (q.float() * scales[:, None]).reshape(shape)


# --- NF4 ---------------------------------------------------------------------------------------

def nf4_offset() -> float:
    """The outermost quantile QLoRA uses: halfway between 1 - 1/(2*15) and 1 - 1/(2*16).

    The quantile function of the normal distribution is infinite at 0 and 1, so the extremes are
    taken slightly inside; bitsandbytes hard-codes this as 0.9677083.
    """
    return 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))


def build_nf4_code(offset: float | None = None) -> torch.Tensor:
    """The 16 NF4 values, derived as the QLoRA paper describes (float32, sorted).

    A symmetric 4-bit code from 16 quantiles has no exact zero. NF4 is asymmetric instead: 8
    positive values from 9 evenly spaced probabilities between ``offset`` and 0.5 (the last one,
    0.5, is dropped: it is zero), 7 negative values from 8 probabilities, and an exact 0. Each
    half is the normal quantile function ``Phi^-1`` at those probabilities; all are divided by the
    largest so the code spans [-1, 1].
    """
    offset = nf4_offset() if offset is None else offset
    positive_probs = torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1]
    negative_probs = torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1]
    positive = torch.special.ndtri(positive_probs)
    negative = -torch.special.ndtri(negative_probs)
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.max()).float()


def check_4bit_input(x: torch.Tensor, blocksize: int) -> None:
    """Refuse what bitsandbytes' ``quantize_4bit`` refuses, with a message that says what to do."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f"4-bit quantization takes float32, float16 or bfloat16 tensors, got "
                         f"{x.dtype}; convert with x.float() first")
    if blocksize not in BNB_BLOCKSIZES:
        raise ValueError(f"block size {blocksize} is not one of {BNB_BLOCKSIZES}")


def block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The largest magnitude in each block of the flattened fp32 tensor. A shorter last block
    counts as its own block, and its absmax is kept at least 1e-38, as bitsandbytes does."""
    full = flat.numel() - flat.numel() % blocksize
    absmax = flat[:full].reshape(-1, blocksize).abs().amax(dim=1)
    if full < flat.numel():
        absmax = torch.cat([absmax, flat[full:].abs().amax().clamp(min=1e-38).reshape(1)])
    return absmax


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted ``code`` for every value in ``scaled``.

    Decision boundaries are the midpoints between neighbouring code values; a value exactly on a
    midpoint goes to the lower code (what bitsandbytes does, via ``torch.bucketize``).
    """
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints)


def quantize_blockwise_codebook(x: torch.Tensor, code: torch.Tensor, blocksize: int
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise quantization onto a sorted code in [-1, 1]: per block, divide by the absmax
    and round to the nearest code value. Returns flat uint8 indices and fp32 absmax per block.

    The scaling multiplies by the reciprocal of absmax rather than dividing, as bitsandbytes does:
    the two can differ in the last bit, which can flip a value that lies on a boundary.
    """
    flat = x.reshape(-1).float()
    absmax = block_absmax(flat, blocksize)
    per_value = torch.repeat_interleave(absmax, blocksize)[:flat.numel()]
    scaled = torch.clamp(flat * (1.0 / per_value.clamp(min=1e-38)), -1, 1)
    return nearest_code(scaled, code).to(torch.uint8), absmax


def dequantize_blockwise_codebook(indices: torch.Tensor, absmax: torch.Tensor,
                                  code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The inverse of ``quantize_blockwise_codebook``, flat and in fp32: each index's code value
    times its block's absmax (one fp32 multiplication, as bitsandbytes computes it)."""
    flat = indices.reshape(-1).long()
    per_value = torch.repeat_interleave(absmax.float(), blocksize)[:flat.numel()]
    return code[flat] * per_value


def pack_nibbles(indices: torch.Tensor, pad_index: int = 0) -> torch.Tensor:
    """Two 4-bit codes per byte, the even-position code in the high nibble, shaped ``(n/2, 1)``
    like bitsandbytes' packed weights (an odd count is padded with ``pad_index``)."""
    flat = indices.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), pad_index)])
    return ((flat[::2] << 4) | flat[1::2]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of ``pack_nibbles``: ``n`` code indices (int64)."""
    flat = packed.reshape(-1).to(torch.int64)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n]


def quantize_nf4(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize ``x`` (fp32, fp16 or bf16, any shape): ``(packed uint8 (n/2, 1), absmax fp32)``.

    Equals ``bitsandbytes.functional.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")``:
    the same bytes in ``packed`` and the same ``state.absmax``.
    """
    check_4bit_input(x, blocksize)
    indices, absmax = quantize_blockwise_codebook(x, NF4_CODE.to(x.device), blocksize)
    return pack_nibbles(indices, pad_index=NF4_ZERO_INDEX), absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Undo ``quantize_nf4``: look up each code, multiply by its block's absmax in fp32, and
    round to ``dtype``. Equals bitsandbytes' ``dequantize_4bit``."""
    shape = torch.Size(shape)
    n = shape.numel()
    if packed.numel() != -(-n // 2):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {n} values of shape "
                         f"{tuple(shape)}; it needs {-(-n // 2)}")
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(f"{absmax.numel()} absmax values do not match {n} values in blocks of "
                         f"{blocksize}; pass the block size used to quantize")
    values = dequantize_blockwise_codebook(unpack_nibbles(packed, n), absmax,
                                           NF4_CODE.to(packed.device), blocksize)
    return values.to(dtype).reshape(shape)


# --- double quantization -----------------------------------------------------------------------

def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
                       ) -> torch.Tensor:
    """The 8-bit "dynamic" code bitsandbytes uses for blockwise 8-bit quantization (Dettmers
    2016, "8-Bit Approximations for Parallelism in Deep Learning"; Dettmers et al. 2022,
    "8-bit Optimizers via Block-wise Quantization").

    Each code value is a decimal exponent ``10^-k`` times a fraction; the more leading zero bits
    (smaller magnitude), the fewer bits are left for the fraction. So small values are covered
    finely and large ones coarsely, with 0 and 1 exact. 256 sorted values in [-1, 1].
    """
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else \
            2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_CODE = create_dynamic_map()


@dataclass(frozen=True)
class DoubleQuantized:
    """Quantized quantization constants: 8-bit codes, one fp32 absmax per ``blocksize`` of them,
    and the mean that was subtracted first (absmax values are all positive, so centring them
    lets the signed code use both halves)."""

    codes: torch.Tensor
    absmax: torch.Tensor
    offset: torch.Tensor
    blocksize: int = 256


def double_quantize(absmax: torch.Tensor, blocksize: int = 256) -> DoubleQuantized:
    """QLoRA's double quantization of the first-level absmax: subtract their mean, then 8-bit
    blockwise quantization with the dynamic code, each value to its nearest code value.

    ``offset`` equals the ``offset`` of bitsandbytes' ``quantize_4bit(...,
    compress_statistics=True)`` state bit for bit, and the codes and second-level absmax equal
    bitsandbytes' reference (pure PyTorch) blockwise kernel. Its native CPU kernel finds codes
    through a lookup table with 2^-15 resolution, so for a fraction of a percent of values (those
    within 2^-15 of a decision boundary, and values within 2^-15 of zero) it stores a neighbouring
    code; lesson 06 measures this.
    """
    offset = absmax.float().mean()
    codes, second_absmax = quantize_blockwise_codebook(absmax.float() - offset,
                                                       DYNAMIC_CODE.to(absmax.device), blocksize)
    return DoubleQuantized(codes, second_absmax, offset, blocksize)


def double_dequantize(state: DoubleQuantized) -> torch.Tensor:
    """The first-level absmax back, as fp32: code value x second-level absmax + offset."""
    values = dequantize_blockwise_codebook(state.codes, state.absmax,
                                           DYNAMIC_CODE.to(state.codes.device), state.blocksize)
    return values + state.offset


def storage_bits_per_parameter(n_values: int, *tensors: torch.Tensor) -> float:
    """Bits per weight: the bytes of every stored tensor, times 8, over the number of weights."""
    return 8 * sum(t.numel() * t.element_size() for t in tensors) / n_values


def quantization_error(x: torch.Tensor, dequantized: torch.Tensor) -> torch.Tensor:
    """Absolute error per value, in fp32."""
    return (dequantized.float() - x.float()).abs()


@torch.no_grad()
def fake_quantize_linear_layers(model, roundtrip, skip=("lm_head",)) -> int:
    """Replace the weight of every ``nn.Linear`` in ``model`` (except those named in ``skip``) by
    ``roundtrip(weight)``, e.g. quantize-then-dequantize; returns how many layers changed.

    What a 4-bit layer computes is ``x @ dequantized(W).T``; doing the round trip once on the
    weights gives the same numbers in an ordinary fp32 model, so its effect can be measured.
    """
    changed = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in skip:
            module.weight.copy_(roundtrip(module.weight.detach()).to(module.weight.dtype))
            changed += 1
    return changed


def nf4_roundtrip(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False
                  ) -> torch.Tensor:
    """Quantize to NF4 and back, in the weight's own dtype (with double-quantized absmax if
    ``double_quant``, as ``BitsAndBytesConfig(bnb_4bit_use_double_quant=True)`` stores them)."""
    packed, absmax = quantize_nf4(weight, blocksize)
    if double_quant:
        absmax = double_dequantize(double_quantize(absmax))
    return dequantize_nf4(packed, absmax, weight.shape, blocksize, weight.dtype)


INT4_CODE = torch.arange(-7, 8, dtype=torch.float32) / 7  # symmetric absmax INT4: 15 levels


def codebook_roundtrip(weight: torch.Tensor, code: torch.Tensor, blocksize: int = 64
                       ) -> torch.Tensor:
    """Blockwise absmax quantization onto any sorted ``code`` in [-1, 1], and back: the same
    procedure as NF4 with another set of 16 (or fewer) values, e.g. ``INT4_CODE`` or FP4."""
    indices, absmax = quantize_blockwise_codebook(weight, code, blocksize)
    return dequantize_blockwise_codebook(indices, absmax, code, blocksize).to(
        weight.dtype).reshape(weight.shape)


def level_usage(x: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Share of the values of ``x`` that blockwise absmax quantization onto the sorted ``code``
    stores at each of its levels: a float tensor of ``len(code)`` shares adding up to 1."""
    indices, _ = quantize_blockwise_codebook(x, code, blocksize)
    return torch.bincount(indices.long(), minlength=len(code)).float() / x.numel()


def bits_of_information(usage: torch.Tensor) -> float:
    """What one stored code tells on average, in bits: the entropy of the levels' ``usage``
    shares. ``log2(len(usage))`` (4 bits for 16 levels) only when every level is used equally."""
    used = usage[usage > 0].double()
    return float(-(used * used.log2()).sum())
