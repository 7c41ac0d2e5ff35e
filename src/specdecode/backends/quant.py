"""Weight-only int4 / int8 quantization of the native backend's linear layers.

Decoding on a CPU is bound by the bytes of weights read per token, so a copy of the weights in
4 or 8 bits runs a forward in a fraction of the time. Two uses:

* the ``quant`` drafter: the target drafts for itself through a quantized copy of its own linears
  (built here at load, no second model), and the full-precision target verifies;
* a quantized target by choice (``--quantize``; ``--draft-quant`` for an sps draft model): the
  model's own linears are replaced, and every method is exact against that model's plain decoding.

Formats (round to nearest, no calibration data):

* int4, group-wise asymmetric: along the input dimension, each group of ``group_size`` weights has
  a scale s and an offset z, stored in the activation dtype; w = (q - 8) * s + z, q in 0..15.
  The 16 levels span the group's [min, max].
* int8, per output channel, symmetric: w = q * s, q in -128..127, s = max|w| / 127.

Kernels: on CPU, torch's packed weight-only products (``aten._weight_int4pack_mm_for_cpu`` on a
weight packed by ``aten._convert_weight_to_int4pack_for_cpu``; ``aten._weight_int8pack_mm``).
Elsewhere (another device, a dtype or shape the kernel refuses, a torch without them) a pure-torch
fallback dequantizes the weight and multiplies, correct everywhere but not faster than the
full-precision product. Each kernel is tried once per device and dtype against the fallback
before it is trusted, so a change of packing format in a later torch cannot go unnoticed.

Shapes the int4 kernel cannot take (input size not a multiple of the group, output size not a
multiple of 16) are padded with zero weights; the padding reads as zero and is cut off.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import InvalidArgument
from . import invariance
from .kernels import Linear

BITS = (4, 8)
# The group sizes the CPU int4 kernel implements; the fallback would take others, but one set of
# valid options everywhere is simpler to explain.
INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 32  # the most accurate: agrees with bf16 nearly as often as int8 does
INT4_N_MULTIPLE = 16  # the CPU int4 kernel's output tiles
# The CPU int8 kernel crashes (torch 2.13, bf16, 2+ rows) on an input size that is not a
# multiple of 16; such weights get zero columns.
INT8_K_MULTIPLE = 16
INNER_K_TILES = 2  # an argument of the CUDA packing; the CPU packing ignores it but asks for it


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    bits: 4 or 8. group_size: int4 only (one of INT4_GROUP_SIZES); int8 is per output channel.
    keep_layers: decoder layers whose linears stay in full precision (negative counts from the
    end). lm_head: whether the output projection is quantized too (the embedding lookup never is).
    """

    bits: int = 4
    group_size: int | None = DEFAULT_GROUP_SIZE
    keep_layers: tuple[int, ...] = ()
    lm_head: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise InvalidArgument("bits", f"expected 4 or 8, got {self.bits!r}")
        g = self.group_size
        if self.bits == 8:
            if g is not None:
                raise InvalidArgument("group_size", f"int8 is quantized per output channel, without groups; got group_size={g!r} (leave it unset)")
        elif isinstance(g, bool) or g not in INT4_GROUP_SIZES:
            raise InvalidArgument("group_size", f"expected one of {', '.join(map(str, INT4_GROUP_SIZES))} for int4, got {g!r}")
        keep = self.keep_layers
        if isinstance(keep, int) and not isinstance(keep, bool):
            keep = (keep,)
        if isinstance(keep, (str, bytes)) or not isinstance(keep, Iterable):
            raise InvalidArgument("keep_layers", f"expected a list of layer indices, got {self.keep_layers!r}")
        keep = tuple(keep)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in keep):
            raise InvalidArgument("keep_layers", f"expected a list of layer indices, got {self.keep_layers!r}")
        object.__setattr__(self, "keep_layers", keep)
        if not isinstance(self.lm_head, bool):
            raise InvalidArgument("quantize_lm_head", f"expected true or false, got {self.lm_head!r}")

    @classmethod
    def make(cls, bits: int = 4, group_size: int | None = None, keep_layers=(), lm_head: bool = False) -> "QuantConfig":
        """Like the constructor, but a missing group size means the default for the bit width."""
        if group_size is None and bits == 4:
            group_size = DEFAULT_GROUP_SIZE
        return cls(bits, group_size, keep_layers, lm_head)

    @classmethod
    def parse(cls, text: "str | QuantConfig", argument: str = "quantize", *, lm_head: bool = True) -> "QuantConfig":
        """``int4``, ``int4-g128`` or ``int8`` (a command-line value) -> a config of every linear."""
        if isinstance(text, QuantConfig):
            return text
        if not isinstance(text, str):
            raise InvalidArgument(argument, f"expected int4, int4-gN (N in {INT4_GROUP_SIZES}) or int8, got {text!r}")
        name, _, group = text.strip().lower().partition("-g")
        try:
            bits = {"int4": 4, "int8": 8}[name]
            group_size = int(group) if group else None
            return cls.make(bits, group_size, lm_head=lm_head)
        except (KeyError, ValueError, InvalidArgument) as e:
            why = f" ({e.message})" if isinstance(e, InvalidArgument) else ""
            raise InvalidArgument(
                argument, f"expected int4, int4-gN (N in {', '.join(map(str, INT4_GROUP_SIZES))}) or int8, got {text!r}{why}"
            ) from None

    @property
    def label(self) -> str:
        return "int8" if self.bits == 8 else f"int4-g{self.group_size}"

    def kept(self, num_layers: int) -> frozenset[int]:
        """keep_layers as indices in 0..num_layers-1; an index outside the model is an error."""
        out = set()
        for i in self.keep_layers:
            if not -num_layers <= i < num_layers:
                raise InvalidArgument("keep_layers", f"layer {i} is outside the model's {num_layers} layers (0..{num_layers - 1}, or negative from the end)")
            out.add(i % num_layers)
        return frozenset(out)


# ---- quantize / dequantize ------------------------------------------------------------------------


def _pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _tiny(dtype: torch.dtype) -> float:
    # Smallest scale kept: an all-zero group (or row) still divides safely.
    return torch.finfo(dtype).tiny if dtype.is_floating_point else 1e-30


QUANT_CHUNK_ROWS = 1024  # output rows quantized (and packed) at a time: bounds the float32 temporaries


def quantize_int4(weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] weight -> (q [N', K'] uint8 in 0..15, scales_and_zeros [K'/group, N', 2] in ``dtype``).

    N' and K' are N and K padded with zero weights to multiples of 16 and of the group size. The
    scale and offset are rounded to ``dtype`` before q is chosen, so q is the nearest level of
    the grid actually used: |w - dequantized| <= s / 2 (up to the rounding of the grid's ends).
    Rows are done ``QUANT_CHUNK_ROWS`` at a time: the float32 work of a whole output layer
    (152k x 1.5k for Qwen's lm_head) took several GB at once.
    """
    n, k = weight.shape
    n2, k2 = _pad_to(n, INT4_N_MULTIPLE), _pad_to(k, group_size)
    q = torch.empty(n2, k2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(k2 // group_size, n2, 2, dtype=dtype, device=weight.device)
    for lo in range(0, n2, QUANT_CHUNK_ROWS):
        hi = min(lo + QUANT_CHUNK_ROWS, n2)
        rows = weight.detach()[lo : min(hi, n)].float()  # padding rows past n are zero weights
        w = F.pad(rows, (0, k2 - k, 0, hi - lo - rows.shape[0]))
        groups = w.view(hi - lo, k2 // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp_min(_tiny(dtype)).to(dtype).float()
        zero = (low + 8 * scale).to(dtype).float()  # the kernel's offset: w = (q - 8) * s + z
        q[lo:hi] = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15).view(hi - lo, k2).to(torch.uint8)
        scales[:, lo:hi] = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(dtype)
    return q, scales


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of ``quantize_int4`` (padded shape), in float32."""
    n2, k2 = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # [N', K'/group, 2]
    groups = q.float().view(n2, k2 // group_size, group_size)
    return ((groups - 8) * sz[..., :1] + sz[..., 1:]).view(n2, k2)


def quantize_int8(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] weight -> (q [N, K'] int8, scales [N] in ``dtype``); |w - q s| <= s / 2. K' is K
    padded with zero weights to a multiple of INT8_K_MULTIPLE. Rows ``QUANT_CHUNK_ROWS`` at a time."""
    n, k = weight.shape
    k2 = _pad_to(k, INT8_K_MULTIPLE)
    q = torch.empty(n, k2, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n, dtype=dtype, device=weight.device)
    for lo in range(0, n, QUANT_CHUNK_ROWS):
        w = F.pad(weight.detach()[lo : lo + QUANT_CHUNK_ROWS].float(), (0, k2 - k))
        scale = (w.abs().amax(dim=1) / 127).clamp_min(_tiny(dtype)).to(dtype)
        q[lo : lo + QUANT_CHUNK_ROWS] = torch.round(w / scale.float()[:, None]).clamp_(-128, 127).to(torch.int8)
        scales[lo : lo + QUANT_CHUNK_ROWS] = scale
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


def _int4_pack(q: torch.Tensor) -> torch.Tensor:
    """The CPU int4 kernel's packing of levels q [N, K] (uint8 0..15), ``QUANT_CHUNK_ROWS`` rows at
    a time where packing rows apart is checked to equal packing them together (the kernel takes
    int32 levels: 4 bytes a weight for a whole layer at once)."""
    def pack(rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows.to(torch.int32), INNER_K_TILES)

    if q.shape[0] <= QUANT_CHUNK_ROWS or not _chunked_packing_ok(q.device):
        return pack(q)
    return torch.cat([pack(q[lo : lo + QUANT_CHUNK_ROWS]) for lo in range(0, q.shape[0], QUANT_CHUNK_ROWS)])


_CHUNKED_PACKING_OK: dict[str, bool] = {}


def _chunked_packing_ok(device: torch.device) -> bool:
    """Whether the kernel packs each block of rows on its own (its layout depends on the
    instruction set), checked once per device against packing the whole."""
    key = str(device)
    if key not in _CHUNKED_PACKING_OK:
        q = torch.randint(0, 16, (2 * QUANT_CHUNK_ROWS + 64, 128), generator=torch.Generator().manual_seed(0),
                          dtype=torch.int32).to(device)  # fmt: skip
        whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INNER_K_TILES)
        parts = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[lo : lo + QUANT_CHUNK_ROWS], INNER_K_TILES)
                 for lo in range(0, q.shape[0], QUANT_CHUNK_ROWS)]  # fmt: skip
        _CHUNKED_PACKING_OK[key] = torch.equal(torch.cat(parts), whole)
    return _CHUNKED_PACKING_OK[key]


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int32 levels 0..15 [N, K] (K even) -> uint8 [N, K/2], two levels a byte."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=-1).view(packed.shape[0], -1)


# ---- kernels --------------------------------------------------------------------------------------


def _int4_cpu_kernel(x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)


_KERNEL_OK: dict[tuple, bool] = {}


def _kernel_works(bits: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's packed kernel exists for this device and dtype and computes what the
    dequantize-and-multiply reference computes (tried once on a small random weight)."""
    key = (bits, device.type, dtype)
    if key in _KERNEL_OK:
        return _KERNEL_OK[key]
    ok = False
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16, torch.float32):
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(48, 96, generator=g)
        x = torch.randn(3, 96, generator=g).to(dtype)
        try:
            if bits == 4:
                q, sz = quantize_int4(weight, 32, dtype)
                packed = _int4_pack(q)
                got = _int4_cpu_kernel(x, packed, 32, sz)
                ref = x.float() @ dequantize_int4(q, sz, 32).t()
            else:
                q, s = quantize_int8(weight, dtype)
                got = torch._weight_int8pack_mm(x, q, s)
                ref = x.float() @ dequantize_int8(q, s).t()
            tol = 1e-3 if dtype == torch.float32 else 5e-2
            ok = bool(torch.allclose(got.float(), ref, rtol=tol, atol=tol * float(ref.abs().max())))
        except (RuntimeError, AttributeError, NotImplementedError):
            ok = False
    _KERNEL_OK[key] = ok
    return ok


class QuantLinear(Linear):
    """A linear whose weight is held in int4 or int8 (see the module docstring).

    A ``Linear``: blocks are cut into chunks by the same row-invariance check, so a quantized
    target keeps bf16 speculation bit-exact against its own plain decoding.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int | None = None):
        super().__init__(weight, bias, pack=False)
        self.bits, self.group_size = bits, group_size
        self.dtype, self.device = weight.dtype, weight.device
        n, k = self.shape
        self.in_padded, self.out_padded = k, n
        fast = _kernel_works(bits, weight.device, weight.dtype)
        if bits == 4:
            q, self.scales = quantize_int4(weight, group_size, weight.dtype)
            self.out_padded, self.in_padded = q.shape
            if fast:
                self.qweight = _int4_pack(q)
                self.kernel = f"int4-pack-g{group_size}"
            else:  # two levels a byte: the same memory as the kernel's packing
                self.qweight = _pack_nibbles(q)
                self.kernel = f"int4-dequant-g{group_size}"
        else:
            self.qweight, self.scales = quantize_int8(weight, weight.dtype)
            self.in_padded = self.qweight.shape[1]
            self.kernel = "int8-pack" if fast else "int8-dequant"
        self.fast = fast
        # What the row-invariance cache is keyed on: the quantized values and scales decide
        # every product (digested now, while the levels are at hand in plain form).
        levels = q if bits == 4 else self.qweight
        self.fingerprint = invariance.weight_fingerprint(levels) + invariance.weight_fingerprint(self.scales)
        # No reference to the full-precision weight is kept: for a quantized target it is freed.
        self.weight = self.source = None

    @classmethod
    def from_linear(cls, linear: Linear, config: QuantConfig) -> Linear:
        """A quantized copy of ``linear``. A linear that is already quantized (a quantized
        target) is requantized from its int8 values when that makes it smaller, else kept as
        it is: a copy can never be more precise than what it copies."""
        group = config.group_size if config.bits == 4 else None
        if isinstance(linear, QuantLinear):
            if linear.bits == 8 and config.bits == 4:
                return cls(linear.dequantized(), linear.bias, 4, group)
            return linear
        return cls(linear.plain(), linear.bias, config.bits, group)

    @property
    def nbytes(self) -> int:
        """Bytes this linear holds (quantized weight, scales, bias)."""
        tensors = [self.qweight, self.scales] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def dequantized(self) -> torch.Tensor:
        """The weight this linear multiplies by, [N, K] in the activation dtype.

        For the CPU int4 kernel's packing (its layout depends on the instruction set) this
        multiplies the identity through the kernel: exact in float32, and slow for large
        inputs (tests only)."""
        n, k = self.shape
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scales)[:, :k].to(self.dtype)
        if self.fast:
            eye = torch.eye(self.in_padded, dtype=self.dtype, device=self.device)
            w = _int4_cpu_kernel(eye, self.qweight, self.group_size, self.scales).t()
            return w[:n, :k].contiguous()
        q = _unpack_nibbles(self.qweight)
        return dequantize_int4(q, self.scales, self.group_size)[:n, :k].to(self.dtype)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.shape
        if self.in_padded != k:
            x = F.pad(x, (0, self.in_padded - k))
        if self.bits == 4 and self.fast:
            y = _int4_cpu_kernel(x, self.qweight, self.group_size, self.scales)
        elif self.bits == 8 and self.fast:
            y = torch._weight_int8pack_mm(x, self.qweight, self.scales)
        elif self.bits == 4:
            w = dequantize_int4(_unpack_nibbles(self.qweight), self.scales, self.group_size).to(x.dtype)
            y = F.linear(x, w)
        else:
            y = F.linear(x, dequantize_int8(self.qweight, self.scales).to(x.dtype))
        if self.out_padded != n:
            y = y[:, :n]
        return y if self.bias is None else y + self.bias



# ---- whole models ---------------------------------------------------------------------------------

ROLES = ("qkv", "o", "gate_up", "down")


@dataclass
class QuantizedWeights:
    """A quantized copy of a native backend's linears: what ``NativeBackend.forward(weights=)``
    runs instead of the model's own. Norms, embedding and kept layers are the model's own
    objects (shared, no copy)."""

    config: QuantConfig
    layers: list
    lm_head: Linear
    kept: frozenset[int] = field(default_factory=frozenset)
    nbytes: int = 0  # bytes of the new quantized linears: what the copy adds to the model's memory


def layer_quantizer(config: QuantConfig, num_layers: int):
    """``(index, layer) -> (quantized layer, bytes added)``: a copy of a decoder layer with its
    linears quantized (norms shared), or the layer itself where ``config`` keeps it. One layer at
    a time, so that a quantized copy or a quantized load never holds a second full-precision
    copy of the model."""
    kept = config.kept(num_layers)

    def quantize(index: int, layer):
        if index in kept:
            return layer, 0
        twin = copy.copy(layer)  # shares the norms
        added = 0
        for role in ROLES:
            linear = getattr(layer, role)
            q = QuantLinear.from_linear(linear, config)
            added += q.nbytes if q is not linear else 0
            setattr(twin, role, q)
        return twin, added

    return quantize


def quantized_copy(backend, config: QuantConfig) -> QuantizedWeights:
    """Quantized copies of ``backend``'s decoder-layer linears (and lm_head if asked); kept
    layers and the lm_head otherwise are the backend's own."""
    quantize = layer_quantizer(config, len(backend.layers))
    layers, added = [], 0
    for i, layer in enumerate(backend.layers):
        layer, n = quantize(i, layer)
        layers.append(layer)
        added += n
    lm_head = backend.lm_head
    if config.lm_head:
        lm_head = QuantLinear.from_linear(backend.lm_head, config)
        added += lm_head.nbytes if lm_head is not backend.lm_head else 0
    return QuantizedWeights(config, layers, lm_head, config.kept(len(backend.layers)), added)


def full_precision_bytes(backend) -> int:
    """Bytes of the weights a quantized copy replaces, at the backend's dtype (for comparison)."""
    linears = [getattr(layer, r) for layer in backend.layers for r in ROLES]
    return sum(lin.shape[0] * lin.shape[1] * backend.dtype.itemsize for lin in linears)
