"""QuantConfig: what to quantize and how."""

from __future__ import annotations

from dataclasses import dataclass

from edgeslim.core.config import Config, StrEnum


class QuantMode(StrEnum):
    """``static``: INT8 weights and activations, activation ranges from calibration data.
    ``dynamic``: INT8 weights, activation ranges computed per batch at run time.
    ``fp16``: half-precision weights and activations."""

    STATIC = "static"
    DYNAMIC = "dynamic"
    FP16 = "fp16"


class WeightRange(StrEnum):
    """How each weight scale is chosen. ``minmax``: the largest weight maps to the largest integer.
    ``mse``: a grid search per channel for the clipping scale that minimises the weights' squared error
    (clips outliers; the big win at 4 bits, little change at 8)."""

    MINMAX = "minmax"
    MSE = "mse"


class Capture(StrEnum):
    """How the model's operations are found. ``fx``: torch.fx tracing that matches ``nn.Conv1d/Conv2d/Linear``
    modules (the torch fake-quant model that QAT, AdaRound, bias correction and mixed precision need). ``onnx``: the
    exported ONNX graph, which sees every convolution, linear and matmul however it is called (functional ops,
    ``nn.Conv2d`` subclasses, attention, Hugging Face models), quantized by ONNX Runtime's QDQ writer from edgeslim's
    calibrated ranges. ``auto``: fx when it covers at least 90% of the model's Conv/Linear/MatMul MACs, else onnx."""

    AUTO = "auto"
    FX = "fx"
    ONNX = "onnx"


class Placement(StrEnum):
    """Which quantizable layers run integer kernels. ``all``: every one the capture quantizes. ``measured`` (ONNX
    capture, static): the layers whose integer kernel ONNX Runtime runs slower than their float one on this host (e.g.
    a 3-channel stem convolution, narrow depthwise convolutions on x86 without VNNI) stay float, when timing the whole
    file shows it faster that way (see :mod:`edgeslim.quantize._placement`)."""

    ALL = "all"
    MEASURED = "measured"


class ActivationType(StrEnum):
    """Activation integer type. ``uint8`` with ``int8`` weights is the fast path on x86 without VNNI."""

    UINT8 = "uint8"
    INT8 = "int8"


@dataclass(frozen=True)
class QuantConfig(Config):
    """Post-training quantization settings.

    Attributes:
        mode: ``static``, ``dynamic`` or ``fp16``.
        calibration: activation-range method for static mode: one of
            :data:`edgeslim.quantize.CALIBRATORS` (``minmax``, ``percentile``, ``entropy``, ``mse``).
        per_channel: one weight scale per output channel (else one per tensor).
        per_tensor_sqnr_db: with ``per_channel``, a layer whose output channels' weights, quantized with one scale
            for the whole tensor, still keep at least this SQNR against float (dB; all channels but the worst tenth)
            takes that one scale (the report lists them with their SQNRs).
            Each per-channel layer stores a weight scale, a bias scale and a zero point per output channel, so this
            makes the file smaller where it costs little: layers with even channel ranges (typically pointwise
            convolutions; more of them after ``equalize``) clear 35 dB, depthwise ones seldom do. ``None``
            (default): every layer per channel. fx capture only (the ONNX capture says it ignores it).
        activation_type: ``uint8`` (default, asymmetric) or ``int8`` (symmetric).
        weight_bits: weight bit width, 8 or 4 (symmetric signed integers; 4-bit weights are stored in
            int8 containers in ONNX, so they simulate W4 accuracy but the file is not smaller).
        weight_range: ``minmax`` (default) or ``mse``: how each weight scale is chosen (:class:`WeightRange`).
        reduce_range: use 7-bit weights, which avoids the u8 x s8 int16 saturation of the integer kernels of
            x86 CPUs without VNNI (exact on every x86 CPU; costs a little resolution). Depthwise convolutions keep
            8-bit weights: ONNX Runtime's depthwise kernel does not saturate (see
            :func:`edgeslim.quantize._api.keeps_full_range`). ``None`` (default): decided
            by this host (:func:`edgeslim.core.metrics.u8s8_saturates`): 7-bit on x86 without VNNI, else 8-bit;
            ``quantize`` records the value it used in the model's config and recipe, and the report says why.
        percentile: the kept mass for ``percentile`` calibration, in percent (e.g. 99.99).
        num_samples: calibration samples drawn (class-balanced) from the calibration data.
        exclude: module names or fnmatch patterns (``features.0.*``) of layers kept in floating point.
        int8_layers: with ``weight_bits=4``, module names or fnmatch patterns of layers whose weights stay 8-bit
            (mixed precision without float layers: every layer still runs an integer kernel).
        quantize_output: also quantize the network's final layer output (logits).
        equalize: cross-layer equalization before quantization (ReLU6 in equalized pairs become ReLU).
        adaround: learn each weight's rounding (up or down) layer by layer on the calibration data
            (AdaRound) instead of rounding to nearest (static mode).
        adaround_iterations: optimisation steps per layer for AdaRound (AIMET uses 10k; 500-2k fit a CPU).
        adaround_samples: calibration samples AdaRound reconstructs each layer on (at most ``num_samples``).
        bias_correction: subtract each quantized layer's mean output error on the calibration data from its
            bias (static mode). ``None`` (default): on for the ONNX capture, off for fx. The fx capture measures
            each layer's error layer by layer on the fake-quant model (a pass per layer); the ONNX capture removes
            the shift weight rounding causes, ``-sum(dW * E[x])`` per output channel with the per-channel input
            means measured in the calibration pass (no extra pass: under a second on YOLOv8n; +1.3 to +2.9 dB SQNR
            vs FP32 on MobileNetV2 and an EfficientNet-like net at 224x224).
        seed: seed of the calibration subset.
        capture: ``auto`` (default), ``fx`` or ``onnx`` (:class:`Capture`): how the model's operations are found.
        tail_sqnr_db: the ONNX capture's head precision (static mode): every node between a graph output and the
            last Conv/Gemm/MatMul of its branch that ORT would quantize is quantized alone and stays float when an
            output part (each input of a graph-output Concat, e.g. a detector's boxes and its scores) falls below
            this SQNR against float; Concats joining ranges more than 16x apart stay float too. ``None``: off.
        check_speed: after quantizing, time the INT8 file against the FP32 file on this host (ONNX Runtime,
            batch 1, interleaved rounds) and put the result in the report; the summary says plainly when INT8 is
            slower.
        placement: ``all`` (default) or ``measured`` (:class:`Placement`): keep float the layers whose integer
            kernel is slower on this host, decided by ONNX Runtime's profiler and proved by timing the whole file
            (``QuantReport.placement`` holds the figures). Static mode; takes the ONNX capture (``auto`` picks it).
        placement_threads: the thread count the placement is measured at (the deployment's).
        runtime: the runtime the static INT8 graph is laid out for: ``onnxruntime`` (default: every quantizable
            op's output quantized, so Convs fuse into QLinearConv) or ``openvino`` (Q/DQ pairs where OpenVINO's
            low-precision transformations want them: none between a Conv and its activation, none after
            precision-preserving ops, a Concat's inputs on one shared range; see
            :mod:`edgeslim.quantize._layout`). The file still runs in ONNX Runtime (same results), slower there.
            Static mode; takes the ONNX capture (``auto`` picks it).
    """

    kind = "quantize"
    mode: QuantMode = QuantMode.STATIC
    calibration: str = "mse"
    per_channel: bool = True
    per_tensor_sqnr_db: float | None = None
    activation_type: ActivationType = ActivationType.UINT8
    weight_bits: int = 8
    weight_range: WeightRange = WeightRange.MINMAX
    reduce_range: bool | None = None
    percentile: float = 99.99
    num_samples: int = 512
    exclude: tuple[str, ...] = ()
    int8_layers: tuple[str, ...] = ()
    quantize_output: bool = False
    equalize: bool = False
    adaround: bool = False
    adaround_iterations: int = 1000
    adaround_samples: int = 256
    bias_correction: bool | None = None
    seed: int = 0
    capture: Capture = Capture.AUTO
    tail_sqnr_db: float | None = 50.0
    check_speed: bool = False
    placement: Placement = Placement.ALL
    placement_threads: int = 1
    runtime: str = "onnxruntime"

    @property
    def weights_7bit(self) -> bool:
        """Whether 8-bit weights use the 7-bit range: ``reduce_range``, or this host's answer when it is None."""
        if self.reduce_range is None:
            from edgeslim.core.metrics import u8s8_saturates

            return u8s8_saturates() is not None
        return self.reduce_range

    def for_host(self) -> tuple[QuantConfig, str | None]:
        """This config with ``reduce_range`` decided (when it is None) and why, for the report (None: nothing to
        say: the user chose, the precision has no 8-bit weights, or the host needs no 7-bit range)."""
        if self.reduce_range is not None:
            return self, None
        from edgeslim.core.metrics import u8s8_saturates

        why = u8s8_saturates()
        if why is None:
            return self.replace(reduce_range=False), None
        # decided for every precision: 4-bit weights ignore it, and the 8-bit layers a budget search adds later
        # (``int8_layers``) take it from this config
        resolved = self.replace(reduce_range=True)
        if self.mode == QuantMode.FP16 or (self.weight_bits != 8 and not self.int8_layers):
            return resolved, None
        return resolved, (
            f"8-bit weights use the 7-bit range, depthwise convolutions' the full one (reduce_range chosen by the "
            f"host: {why}; set reduce_range=False for a file meant for a CPU with VNNI)"
        )

    def validate(self) -> None:
        from edgeslim.quantize._calibrate import CALIBRATORS

        if self.calibration not in CALIBRATORS:
            CALIBRATORS.get(self.calibration)  # raises, listing the valid names
        if self.weight_bits not in (4, 8):
            raise self._bad("weight_bits", "supported: 4, 8")
        if not 50.0 < self.percentile <= 100.0:
            raise self._bad("percentile", "must be in (50, 100]")
        if self.adaround_iterations < 1:
            raise self._bad("adaround_iterations", "must be >= 1")
        if self.adaround_samples < 1:
            raise self._bad("adaround_samples", "must be >= 1")
        if self.tail_sqnr_db is not None and not 0.0 < self.tail_sqnr_db <= 100.0:
            raise self._bad("tail_sqnr_db", "must be in (0, 100] dB, or None to switch the tail sensitivity off")
        if self.per_tensor_sqnr_db is not None:
            if not self.per_channel:
                raise self._bad("per_tensor_sqnr_db", "only applies with per_channel=True (every layer is per tensor)")
            if not 0.0 < self.per_tensor_sqnr_db <= 100.0:
                raise self._bad("per_tensor_sqnr_db", "must be in (0, 100] dB, or None for per-channel everywhere")
        if self.placement == Placement.MEASURED and self.mode != QuantMode.STATIC:
            raise self._bad("placement", "'measured' applies to static mode (integer kernels timed against float)")
        from edgeslim.quantize._layout import LAYOUTS

        if self.runtime not in LAYOUTS:
            raise self._bad("runtime", f"one of: {', '.join(LAYOUTS)}")
        if self.runtime != "onnxruntime" and self.mode != QuantMode.STATIC:
            raise self._bad("runtime", "a Q/DQ layout applies to static mode (dynamic and fp16 have no Q/DQ pairs)")
        if self.runtime != "onnxruntime" and self.placement == Placement.MEASURED:
            raise self._bad(
                "runtime",
                "placement='measured' times ONNX Runtime's kernels; it cannot place layers for "
                f"runtime={self.runtime!r} (use placement='all')",
            )
        if not 1 <= self.placement_threads <= 256:
            raise self._bad("placement_threads", "must be in 1..256")
        if self.num_samples < 1:
            raise self._bad("num_samples", "must be >= 1")
        if not all(isinstance(e, str) and e for e in self.exclude):
            raise self._bad("exclude", "must be non-empty module names or fnmatch patterns")
        if not all(isinstance(e, str) and e for e in self.int8_layers):
            raise self._bad("int8_layers", "must be non-empty module names or fnmatch patterns")
        if self.int8_layers and self.weight_bits != 4:
            raise self._bad("int8_layers", "only applies with weight_bits=4 (the other layers' weights are 4-bit)")
