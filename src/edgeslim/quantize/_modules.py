"""Fake-quantization modules: activations (per tensor) and weights (per channel or per tensor).

They simulate integer arithmetic in floating point with ``torch.fake_quantize_per_*_affine``, which the
ONNX exporter turns into QuantizeLinear/DequantizeLinear pairs.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from edgeslim.quantize._calibrate import Observer


class ActQuant(nn.Module):
    """Per-tensor activation fake-quantizer with an observer for calibration.

    States: ``observe`` (one calibration pass) or ``observe_range`` / ``observe_hist`` (two passes), all
    pass-through; ``quant``
    (fake-quantize with the calibrated scale), ``dynamic`` (range from each batch), ``off`` (pass-through).
    """

    def __init__(self, qmin: int, qmax: int, clamp: tuple[float | None, float | None] = (None, None)) -> None:
        super().__init__()
        self.qmin, self.qmax = int(qmin), int(qmax)
        self.clamp = clamp
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.state = "off"
        self.observer = Observer()
        self._source: ActQuant | None = None  # a quantizer whose scale and zero point this one uses (share())

    def share(self, source: ActQuant) -> None:
        """Use ``source``'s scale and zero point (the output of MaxPool, flatten...: the same integers as its input).

        Kept as a plain reference, not a submodule, so the state_dict holds each scale once per quantizer as before.
        """
        object.__setattr__(self, "_source", source)

    @property
    def shares(self) -> ActQuant | None:
        return self._source

    def copy_source(self) -> None:
        """Take the shared quantizer's calibrated scale and zero point (after calibration)."""
        if self._source is not None:
            with torch.no_grad():
                self.scale.copy_(self._source.scale.detach())
                self.zero_point.copy_(self._source.zero_point)

    def set_range(self, lo: float, hi: float) -> None:
        lo_c, hi_c = self.clamp
        if lo_c is not None:
            lo = max(lo, lo_c)
        if hi_c is not None:
            hi = min(hi, hi_c)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if self.qmin < 0:  # signed: symmetric, zero point 0
            a = max(abs(lo), abs(hi), 1e-8)
            scale, zp = a / self.qmax, 0
        else:
            scale = max((hi - lo) / (self.qmax - self.qmin), 1e-8)
            zp = int(round(self.qmin - lo / scale))
            zp = min(max(zp, self.qmin), self.qmax)
        self.scale.fill_(scale)
        self.zero_point.fill_(zp)

    @property
    def range(self) -> tuple[float, float]:
        s, z = float(self.scale.detach()), int(self.zero_point)
        return (self.qmin - z) * s, (self.qmax - z) * s

    def make_learnable(self) -> None:
        """Turn the scale into a parameter trained with the LSQ gradient (Esser et al. 2020)."""
        if not isinstance(self.scale, nn.Parameter):
            scale = self.scale.detach().clone()
            del self.scale
            self.scale = nn.Parameter(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state == "quant" and not self.training and _eager() and not (x.requires_grad and torch.is_grad_enabled()):
            src = self._source or self
            return _quant_dequant(x, src.scale.detach(), src.zero_point, self.qmin, self.qmax)
        if state == "quant" and self._source is not None and not self.training:
            src = self._source
            return torch.fake_quantize_per_tensor_affine(x, src.scale.detach(), src.zero_point, self.qmin, self.qmax)
        if state == "quant":
            if self.training and isinstance(self.scale, nn.Parameter):
                grad_factor = 1.0 / math.sqrt(x[0].numel() * self.qmax)
                return torch._fake_quantize_learnable_per_tensor_affine(
                    x, self.scale.reshape(1), self.zero_point.float().reshape(1), self.qmin, self.qmax, grad_factor
                )
            return torch.fake_quantize_per_tensor_affine(x, self.scale.detach(), self.zero_point, self.qmin, self.qmax)
        if state == "observe":
            if not self.observer.observe(x):
                from edgeslim.core.errors import QuantizationError

                raise QuantizationError(
                    "an activation quantizer saw a non-finite value (inf or NaN) while calibrating: no 8-bit range "
                    "holds it; exclude the layer producing it (QuantConfig.exclude) or use capture='onnx'"
                )
        elif state == "observe_range":
            self.observer.observe_range(x)
        elif state == "observe_hist":
            self.observer.observe_hist(x)
        elif state == "dynamic":
            lo, hi = float(x.min()), float(x.max())
            self.set_range(lo, hi)
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)
        return x

    def extra_repr(self) -> str:
        return f"q=[{self.qmin},{self.qmax}], state={self.state}, scale={float(self.scale.detach()):.4g}, zp={int(self.zero_point)}"


#: whether torch's quantized tensors serve eval-mode fake quantization (False once they are found missing)
_FAST_QDQ = True
#: torch's quantized dtype of each 8-bit activation range
_QDTYPES = {(0, 255): torch.quint8, (-128, 127): torch.qint8}


def _eager() -> bool:
    """Not being traced or exported: tracers and exporters must see the fake-quantize op (ONNX turns it into
    QuantizeLinear/DequantizeLinear; torch.export and fx keep it as it is)."""
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing

    return not (
        torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or is_fx_symbolic_tracing()
    )


def _quant_dequant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Fake quantization without gradients: quantize to torch's 8-bit dtype and back, the same values as
    ``fake_quantize_per_tensor_affine`` (both round half to even) at 2-3x its speed (that kernel also builds the
    gradient mask: 13 ms of a 32-image MobileNetV2 batch's 20 per quantizer here)."""
    global _FAST_QDQ
    dtype = _QDTYPES.get((qmin, qmax))
    if _FAST_QDQ and dtype is not None and x.dtype == torch.float32:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch marks its quantized dtypes deprecated (still there in 2.14)
                return torch.quantize_per_tensor(x, float(scale), int(zero_point), dtype).dequantize()
        except (AttributeError, RuntimeError, NotImplementedError):  # a torch without them: the fake-quantize op
            _FAST_QDQ = False
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)


def channel_sqnr_quantile_db(w: torch.Tensor, wq: torch.Tensor, quantile: float = 0.1) -> float:
    """The ``quantile`` of the SQNRs (dB, capped at 200) of ``wq`` against ``w`` per output channel (the first
    dimension): how well the worst-resolved channels keep their weights."""
    w, wq = w.flatten(1), wq.flatten(1)
    err = (wq - w).pow(2).sum(1)
    sig = w.pow(2).sum(1)
    db = torch.where(err > 0, 10.0 * torch.log10(sig.clamp_min(1e-30) / err.clamp_min(1e-30)), 200.0)
    return float(torch.quantile(db.clamp(max=200.0), quantile))


class QuantWeight(nn.Module):
    """Wraps a Conv/Linear layer and fake-quantizes its weight to symmetric signed integers.

    The wrapped layer is kept as ``self.layer`` with its float weight (the quantization is applied in
    ``forward``), so disabling the wrapper gives back the float layer exactly.
    """

    def __init__(self, layer: nn.Module, *, per_channel: bool, qmax: int = 127, fp16: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.per_channel = per_channel
        self.fp16 = fp16
        self.enabled = True
        self.qmax = qmax
        self.qat = ""  # "", "ste" (scales follow the weights) or "lsq" (learned scales)
        self.register_buffer("scale", self._absmax_scale(per_channel))
        self.register_buffer("zero_point", torch.zeros_like(self.scale, dtype=torch.int32))
        # scale of the layer's quantized input; once set, the bias is rounded to int32 at scale
        # input_scale * weight_scale, exactly as the integer kernel adds it
        self.register_buffer("input_scale", torch.tensor(0.0))

    @torch.no_grad()
    def _absmax_scale(self, per_channel: bool) -> torch.Tensor:
        """Scales from the weights' absolute maximum: one per output channel, or one for the tensor (shape (1,))."""
        w = self.layer.weight.detach()
        amax = w.abs().flatten(1).amax(dim=1) if per_channel else w.abs().max().reshape(1)
        return (amax.clamp_min(1e-12) / self.qmax).float()

    @torch.no_grad()
    def set_granularity(self, per_channel: bool) -> None:
        """One scale per output channel or one for the tensor, each from the weights' absolute maximum."""
        self.per_channel = per_channel
        self.scale = self._absmax_scale(per_channel)
        self.zero_point = torch.zeros_like(self.scale, dtype=torch.int32)

    @torch.no_grad()
    def channel_sqnr_db(self, quantile: float = 0.1) -> float:
        """The ``quantile`` of the output channels' SQNRs (each channel's quantized weights against its float ones,
        in dB, capped at 200): how well the worst-resolved channels keep their weights. A whole-tensor SQNR would
        hide them (a few wide channels carry the signal energy while one scale for all rounds the narrow ones)."""
        w = self.layer.weight.detach().float()
        return channel_sqnr_quantile_db(w, self.quantized_weight().detach().float(), quantile)

    @torch.no_grad()
    def fit_scale_mse(self, steps: int = 80, lowest: float = 0.2) -> None:
        """Choose each channel's (or the tensor's) clipping scale by grid search minimising the weight MSE.

        Candidates are ``a * absmax / qmax`` for ``a`` in ``[lowest, 1]``; the scale with the smallest squared
        rounding-plus-clipping error of the weights wins. At 4 bits this clips outlier weights, which costs
        far less than the coarse grid that absmax scaling gives every other weight.
        """
        if self.fp16:
            return
        w = self.layer.weight.detach().float()
        flat = w.flatten(1) if self.per_channel else w.reshape(1, -1)
        amax = flat.abs().amax(dim=1).clamp_min(1e-12)
        lo, hi = (-128, 127) if self.qmax >= 63 else (-self.qmax - 1, self.qmax)
        best_err = torch.full_like(amax, float("inf"))
        best = amax / self.qmax
        for a in torch.linspace(lowest, 1.0, steps):
            s = (a * amax / self.qmax)[:, None]
            err = (torch.clamp(torch.round(flat / s), lo, hi) * s - flat).pow(2).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s[:, 0], best)
        self.scale.copy_(torch.maximum(best.reshape(self.scale.shape), self._bias_floor()))

    def set_input_scale(self, input_scale: float) -> None:
        """Record the input's scale; raise weight scales where the int32 bias would overflow."""
        self.input_scale.fill_(float(input_scale))
        with torch.no_grad():
            self.scale.copy_(torch.maximum(self.scale, self._bias_floor()))

    def quantized_bias(self) -> torch.Tensor | None:
        b = self.layer.bias
        if b is None or not self.enabled or self.fp16 or float(self.input_scale) <= 0:
            return b
        bs = (self.input_scale * self.scale.detach()).expand_as(b)
        return b + (torch.round(b / bs) * bs - b).detach()  # straight-through for training

    def make_learnable(self) -> None:
        if not isinstance(self.scale, nn.Parameter):
            scale = self.scale.detach().clone()
            del self.scale
            self.scale = nn.Parameter(scale)

    def quantized_weight(self) -> torch.Tensor:
        w = self.layer.weight
        if not self.enabled:
            return w
        if self.fp16:
            return w.half().float()
        lo, hi = (-128, 127) if self.qmax >= 63 else (-self.qmax - 1, self.qmax)
        if self.training and self.qat == "lsq":
            grad_factor = 1.0 / math.sqrt(w[0].numel() * hi)
            if self.per_channel:
                return torch._fake_quantize_learnable_per_channel_affine(
                    w, self.scale, self.zero_point.float(), 0, lo, hi, grad_factor
                )
            return torch._fake_quantize_learnable_per_tensor_affine(
                w, self.scale, self.zero_point.float(), lo, hi, grad_factor
            )
        if self.training and self.qat == "ste":  # scales follow the weights as they train
            with torch.no_grad():
                self.scale.copy_(torch.maximum(self._absmax_scale(self.per_channel), self._bias_floor()))
        scale = self.scale.detach()
        if hi < 127:  # sub-8-bit weights travel in an int8 container: clip to the narrow grid first
            shape = (-1,) + (1,) * (w.ndim - 1) if self.per_channel else ()
            s = scale.reshape(shape) if self.per_channel else scale[0]
            w = torch.maximum(torch.minimum(w, s * hi), s * lo)
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(w, scale, self.zero_point, 0, -128, 127)
        return torch.fake_quantize_per_tensor_affine(w, scale[0], self.zero_point[0], -128, 127)

    def _bias_floor(self) -> torch.Tensor:
        b, s_in = self.layer.bias, float(self.input_scale)
        if b is None or s_in <= 0:
            return torch.zeros_like(self.scale)
        floor = b.detach().abs().float() / (s_in * (2**31 - 1) * 0.5)
        return floor.max().reshape(1) if self.scale.numel() == 1 else floor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        layer = self.layer
        b = self.quantized_bias()
        if isinstance(layer, nn.Linear):
            return F.linear(x, w, b)
        return layer._conv_forward(x, w, b)
