"""Case study (BERT -> DistilBERT style): all-MiniLM-L6-v2 sentiment teacher -> 3-layer layer-dropped student.

Teacher: the pretrained MiniLM encoder, **frozen**, with a linear sentiment head trained on the mean-pooled,
L2-normalised sentence embeddings of Rotten Tomatoes (embeddings computed once). A full fine-tune of the teacher
does not fit this benchmark's CPU budget. Student: ``layer_drop_student`` (layers 0, 2, 4 of 6) with the teacher's
head as its initial head, fine-tuned (encoder + head; word-embedding table frozen) in two ways with the same
budget and seed: ``distill()`` with KD on the cached teacher logits (+ hard labels), and cross-entropy only.
A third student composes techniques: the trained KD student with FFN neurons pruned (``edgeslim.prune``, structured,
physically removed: still a ``BertModel``; ``--ffn-keep`` of 1536 per layer kept, L2 importance), recovered by KD
from the same teacher with the same TrainConfig (``--pruned-steps`` caps the steps). Halving the layers at full
width has 2x as its ceiling: with per-layer time L and fixed cost O (embeddings, pooling, head), (6L+O)/(3L+O) < 2.
Every student is then **vocabulary-trimmed** (``edgeslim.prune.prune_vocabulary``) to the tokens of the training
split (+ special tokens); held-out tokens outside it read as ``[UNK]``. The word-embedding table is frozen during
training and every token of the training data is kept, so trimming before or after training gives the same
weights; it is applied after training (one training run serves both the full-vocab and the trimmed rows).

Data: ``es.data.load_text("rotten-tomatoes")`` stratified split (seed 0); a dev slice of the train split picks the
best epoch; accuracy is reported on the whole held-out val split, on ONNX Runtime at batch 1 (no padding).
Rows: FP32 teacher / students, and ORT dynamic INT8 (``quantize_dynamic``, QInt8 weights, as in
``quantize_minilm.py``) of each. Latency: ORT, same thread count, batch 1, real val snippets at their own length,
all rows interleaved in the same rounds; for trimmed rows the id remap (a numpy lookup) is inside the timed call.

    PYTHONPATH=src python benchmarks/distill_minilm.py --smoke                     # a few minutes
    PYTHONPATH=src python benchmarks/distill_minilm.py --only KD                   # train one student (resumable)
    PYTHONPATH=src python benchmarks/distill_minilm.py --only KD-pruned            # needs the KD student
    PYTHONPATH=src python benchmarks/distill_minilm.py --skip-latency              # train + export + accuracy
    PYTHONPATH=src python benchmarks/distill_minilm.py --latency-only              # quiet host: time the exports
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import logging
import os
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch
from _harness import ort_session
from torch import nn

import edgeslim as es
from edgeslim.core.io import write_json
from edgeslim.distill import DistillConfig, distill, layer_drop_student
from edgeslim.prune import PruneConfig, VocabMap, load_pruned, prune, prune_vocabulary, save_pruned
from edgeslim.train import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("distill_minilm")


class TokenSet:
    """Token ids ``(N, max_len)`` (pad 0) with labels; the duck-typed dataset ``fit``/``distill`` accept."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def normalized(self) -> torch.Tensor:
        return self.ids

    def subset(self, idx) -> TokenSet:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return TokenSet(self.ids[idx], self.labels[idx])

    def take(self, n: int, *, seed: int = 0) -> TokenSet:
        if n >= len(self):
            return self
        return self.subset(np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False)))

    def batches(self, batch_size: int = 256):
        return [
            (self.ids[i : i + batch_size], self.labels[i : i + batch_size]) for i in range(0, len(self), batch_size)
        ]


class Pool(nn.Module):
    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return es.models.mean_pool(hidden, mask)


class TextClassifier(nn.Module):
    """``forward(ids)`` with pad id 0: dynamic padding (trims the batch to its longest row), mean pool, head."""

    def __init__(self, bert: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.bert, self.pool, self.head = bert, Pool(), head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).long()
        n = int(mask.sum(1).max())
        ids, mask = ids[:, :n], mask[:, :n]
        return self.head(self.pool(self.bert(input_ids=ids, attention_mask=mask).last_hidden_state, mask))


class Exported(nn.Module):
    """The ONNX graph: ``(input_ids, attention_mask) -> logits`` with dynamic batch and sequence axes."""

    def __init__(self, clf: TextClassifier) -> None:
        super().__init__()
        self.clf = clf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.clf.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.clf.head(self.clf.pool(h, attention_mask))


def tokenize(tok, texts: list[str], max_len: int) -> torch.Tensor:
    return tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")["input_ids"]


def by_length(ids: torch.Tensor) -> np.ndarray:
    return np.argsort((ids != 0).sum(1).numpy(), kind="stable")


@torch.no_grad()
def embeddings(bert: nn.Module, ids: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Mean-pooled embeddings of every row, computed in length order (little padding) and returned in row order."""
    order = by_length(ids)
    out = torch.empty(len(ids), bert.config.hidden_size)
    for i in range(0, len(ids), batch):
        j = torch.as_tensor(order[i : i + batch])
        x = ids[j]
        mask = (x != 0).long()
        n = int(mask.sum(1).max())
        out[j] = es.models.mean_pool(
            bert(input_ids=x[:, :n], attention_mask=mask[:, :n]).last_hidden_state, mask[:, :n]
        )
    return out


def train_head(
    emb: torch.Tensor, y: torch.Tensor, dev_emb: torch.Tensor, dev_y: torch.Tensor, seed: int = 0
) -> tuple[nn.Linear, float]:
    """Logistic regression on frozen embeddings (full-batch AdamW, best weight decay on the dev slice)."""
    best = (None, -1.0)
    for wd in (0.0, 1e-4, 1e-3):
        torch.manual_seed(seed)
        head = nn.Linear(emb.shape[1], 2)
        opt = torch.optim.AdamW(head.parameters(), lr=0.05, weight_decay=wd)
        for _ in range(600):
            opt.zero_grad()
            nn.functional.cross_entropy(head(emb), y).backward()
            opt.step()
        with torch.no_grad():
            acc = float((head(dev_emb).argmax(1) == dev_y).float().mean())
        if acc > best[1]:
            best = (head, acc)
    return best[0], best[1]


def export_onnx(clf: TextClassifier, path: Path, vocab: VocabMap | None = None) -> None:
    import onnx

    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])  # [CLS] this is a test [SEP]
    ex = (ids if vocab is None else vocab(ids), torch.ones(1, 6, dtype=torch.long))
    raw = path.with_suffix(".raw.onnx")
    torch.onnx.export(
        Exported(clf).eval(),
        ex,
        str(raw),
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamo=False,
        opset_version=17,
        dynamic_axes={"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}},
    )
    tmp = path.with_suffix(".tmp.onnx")
    onnx.save(onnx.load(str(raw)), str(tmp))  # one self-contained file
    raw.unlink()
    os.replace(tmp, path)


def unpadded(ids: torch.Tensor) -> list[np.ndarray]:
    """Each row without its padding, ``(1, n)`` int64 ids of the original tokenizer."""
    return [row[None, : int((row != 0).sum())].numpy() for row in ids]


def fingerprint(model: nn.Module) -> str:
    """A hash of the weights (state_dict names, shapes and bytes)."""
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_one(sess, ids: np.ndarray, vocab: VocabMap | None) -> np.ndarray:
    """One batch-1 inference; a trimmed model gets its ids remapped here (part of the timed call)."""
    feed = {
        "input_ids": ids if vocab is None else vocab.old_to_new[ids],
        "attention_mask": np.ones(ids.shape, dtype=np.int64),
    }
    return sess.run(None, feed)[0]


def merge_results(out: Path, meta: dict) -> dict:
    """``meta`` laid over the results already in ``out``: rows are merged one by one (a row this run did not
    time keeps its earlier latency; rows this run did not produce stay), and keys this script does not write
    (the hand-written note and verdict, a latency repeat) stay. Returns what was written."""
    old = json.loads(out.read_text()) if out.is_file() else {}
    merged = {**old, **{k: v for k, v in meta.items() if v is not None or k not in old}}
    rows = dict(old.get("rows", {}))
    for k, r in meta["rows"].items():
        prev = rows.get(k, {})
        same = all(prev.get(f) == r.get(f) for f in ("accuracy", "onnx_bytes"))  # else its old timing is stale
        rows[k] = {**prev, **r} if same else r
    merged["rows"] = rows
    untimed = [k for k, r in rows.items() if "latency_p50_ms" not in r]
    if untimed:
        merged["status"] = f"latency not measured yet for {untimed} (run --latency-only on a quiet host)"
    elif meta.get("latency") is None:
        merged["status"] = old.get("status", meta["status"])
    write_json(out, merged, force=True)
    return merged


TEACHER = "teacher (6 layers, frozen enc.)"
GOAL = "vs teacher FP32: >= 50% smaller ONNX file, >= 2x faster ORT batch-1 p50, >= 97% of teacher accuracy"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--dev", type=int, default=800, help="train rows held out to pick the best epoch")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--hard-weight", type=float, default=0.5)
    ap.add_argument("--min-count", type=int, default=1, help="vocabulary trimming: occurrences in the train split")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training")
    ap.add_argument("--ort-threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved latency rounds")
    ap.add_argument("--latency-texts", type=int, default=30, help="val snippets timed per round")
    ap.add_argument(
        "--only",
        choices=("KD", "CE-only", "KD-pruned"),
        default=None,
        help="train just this student and exit (run KD and CE-only in parallel processes; KD-pruned "
        "starts from the trained KD student; rerun to measure)",
    )
    ap.add_argument(
        "--ffn-keep", type=int, default=768, help="KD-pruned: FFN neurons kept per layer (of 1536; multiple of 8)"
    )
    ap.add_argument("--pruned-steps", type=int, default=0, help="KD-pruned: recovery steps (0: one full epoch)")
    ap.add_argument(
        "--skip-missing",
        action="store_true",
        help="measure only the students already trained (others are listed as not run)",
    )
    phase = ap.add_mutually_exclusive_group()
    phase.add_argument(
        "--skip-latency", action="store_true", help="train, export and measure accuracy (cached in --work); no timing"
    )
    phase.add_argument(
        "--latency-only",
        action="store_true",
        help="time the models a --skip-latency run exported (run it on a quiet host)",
    )
    ap.add_argument("--eval-n", type=int, default=0, help="held-out rows for accuracy (0: all)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("/tmp/distill_minilm"), help="caches and checkpoints")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    for name in ("distill_minilm", "edgeslim"):  # not onnxruntime.quantization's per-tensor INFO lines
        logging.getLogger(name).setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.epochs, args.dev, args.rounds, args.latency_texts = 1, 100, 1, 5
        args.work = args.work.with_name(args.work.name + "_smoke")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or (
        work / "distill_minilm_smoke.json" if args.smoke else ROOT / "benchmarks" / "results" / "distill_minilm.json"
    )
    manifest_path = work / "eval.json"
    if args.latency_only:
        if not manifest_path.is_file():
            raise SystemExit(f"--latency-only needs {manifest_path}: run with --skip-latency first")
        meta = json.loads(manifest_path.read_text())
        measure_latency(meta, args)
        merge_results(out, meta)
        log.info("wrote %s", out)
        return

    t_all = time.perf_counter()
    tok, bert = es.models.load_text("all-minilm-l6-v2")
    train_t, val_t = es.data.load_text("rotten-tomatoes", seed=0)
    if args.smoke:
        train_t, val_t = train_t.take(600), val_t.take(200)
    ids_tr, ids_va = tokenize(tok, train_t.texts, args.max_len), tokenize(tok, val_t.texts, args.max_len)
    order = by_length(ids_tr)  # length-sorted rows: teacher passes in dataset order then pad little
    ids_tr, y_tr = ids_tr[order], train_t.labels[order]
    rng = np.random.default_rng(0)
    dev_idx = np.sort(rng.choice(len(ids_tr), args.dev, replace=False))
    fit_idx = np.setdiff1d(np.arange(len(ids_tr)), dev_idx)
    train = TokenSet(ids_tr[fit_idx], y_tr[fit_idx])
    dev = TokenSet(ids_tr[dev_idx], y_tr[dev_idx])
    val = TokenSet(ids_va, val_t.labels)
    log.info(
        "train %d, dev %d, held-out val %d; mean tokens %.1f (max_len %d)",
        len(train),
        len(dev),
        len(val),
        float((ids_tr != 0).sum(1).float().mean()),
        args.max_len,
    )

    # 1) teacher: frozen encoder + linear head on precomputed mean-pooled embeddings
    emb_path = work / "emb.pt"
    if emb_path.is_file():
        emb = torch.load(emb_path, weights_only=True)
    else:
        t0 = time.perf_counter()
        emb = {"train": embeddings(bert, train.ids), "dev": embeddings(bert, dev.ids)}
        emb["seconds"] = time.perf_counter() - t0
        torch.save(emb, emb_path)
    log.info("teacher embeddings: %.0fs", float(emb["seconds"]))
    head_path = work / "head.pt"
    if head_path.is_file():
        saved = torch.load(head_path, weights_only=True)
        head, dev_acc = nn.Linear(emb["train"].shape[1], 2), float(saved["dev_accuracy"])
        head.load_state_dict(saved["state"])
    else:
        head, dev_acc = train_head(emb["train"], train.labels, emb["dev"], dev.labels)
        torch.save({"state": head.state_dict(), "dev_accuracy": dev_acc}, head_path)
    teacher = TextClassifier(bert, head).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    log.info("teacher head dev accuracy %.4f", dev_acc)

    # 2) students: layers 0, 2, 4 + the teacher's head; word embeddings frozen; same budget for KD and CE-only
    def new_student() -> TextClassifier:
        s = TextClassifier(layer_drop_student(bert), copy.deepcopy(head)).train()
        for p in s.parameters():
            p.requires_grad_(True)
        s.bert.embeddings.word_embeddings.weight.requires_grad_(False)
        return s

    tc = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adamw",
        weight_decay=0.01,
        augment=False,
        seed=0,
        warmup_steps=30,
    )
    kd_cfg = DistillConfig(losses=("kd",), temperature=args.temperature, hard_weight=args.hard_weight)
    train_info: dict[str, dict] = {}
    students: dict[str, TextClassifier] = {}
    width = int(bert.config.intermediate_size)
    pruned_name = f"student KD + FFN {width}->{args.ffn_keep}"
    only = {"KD": "student KD", "CE-only": "student CE-only", "KD-pruned": pruned_name}.get(args.only)
    for name in ("student KD", "student CE-only"):
        if only and name != only and not (only == pruned_name and name == "student KD"):
            continue
        final = work / f"{name.split()[1].lower()}.pt"
        if args.skip_missing and not final.is_file():
            log.warning("%s: not trained yet, left out (--skip-missing)", name)
            continue
        s = new_student()
        if final.is_file():
            s.load_state_dict(torch.load(final, weights_only=True))
            train_info[name] = json.loads(final.with_suffix(".json").read_text())
        else:
            t0 = time.perf_counter()
            torch.manual_seed(0)
            if name == "student KD":
                s = distill(
                    s, teacher, kd_cfg, data=(train, dev), train_config=tc, checkpoint_dir=work / "kd", progress=False
                )
                hist = s.distill_history
            else:
                res = fit(s, train, dev, tc, checkpoint_dir=work / "ce", progress=False)
                s, hist = res.model, res.history
            # after a resume: only this process's part
            train_info[name] = {
                "seconds": round(time.perf_counter() - t0, 1),
                "history": hist,
                "finished_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
            }
            torch.save(s.state_dict(), final)
            final.with_suffix(".json").write_text(json.dumps(train_info[name]))
        students[name] = s.eval()
        log.info("%s ready (%.0fs)", name, train_info[name]["seconds"])

    # 2b) compose: FFN neurons of the trained KD student pruned (physically removed), recovered by KD
    prune_cfg = PruneConfig(method="channel", ratio=1 - args.ffn_keep / width, importance="l2")
    steps_tag = f"-s{args.pruned_steps}" if args.pruned_steps else ""
    pruned_path = work / f"kd-ffn{args.ffn_keep}{steps_tag}"  # recipe .json + state_dict .pt (save_pruned)
    if only in (None, pruned_name) and "student KD" in students:
        ex = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
        if pruned_path.with_suffix(".pt").is_file():
            s = load_pruned(new_student(), pruned_path)
            train_info[pruned_name] = json.loads(pruned_path.with_suffix(".info.json").read_text())
        elif args.skip_missing and only is None:
            log.warning("%s: not trained yet, left out (--skip-missing)", pruned_name)
            s = None
        else:
            s = prune(students["student KD"], prune_cfg, example_inputs=ex)
            widths = {e["ffn"][1] for e in s.prune_report.layers.values()}
            if widths != {args.ffn_keep}:
                raise SystemExit(f"--ffn-keep {args.ffn_keep}: pruning kept {sorted(widths)} (use a multiple of 8)")
            s.train()
            s.bert.embeddings.word_embeddings.weight.requires_grad_(False)
            t0 = time.perf_counter()
            torch.manual_seed(0)
            out_s = distill(
                s,
                teacher,
                kd_cfg,
                data=(train, dev),
                train_config=tc,
                checkpoint_dir=work / "kd",
                progress=False,
                max_steps_per_epoch=args.pruned_steps or None,
            )
            epoch_steps = -(-len(train) // tc.batch_size)
            steps = min(args.pruned_steps or epoch_steps, epoch_steps)
            train_info[pruned_name] = {
                "seconds": round(time.perf_counter() - t0, 1),
                "history": out_s.distill_history,
                "steps": steps,
                "rows_seen": min(steps * tc.batch_size, len(train)),
                "prune_config": prune_cfg.to_dict(),
                "prune_report": s.prune_report.to_dict(),
                "finished_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
            }
            out_s.prune_report = s.prune_report
            save_pruned(out_s, pruned_path, force=True)
            pruned_path.with_suffix(".info.json").write_text(json.dumps(train_info[pruned_name], default=str))
            s = out_s
        if s is not None:
            students[pruned_name] = s.eval()
            log.info("%s ready (%.0fs)\n%s", pruned_name, train_info[pruned_name]["seconds"], s.prune_report.summary())
    if args.only:
        return
    students["student layer-drop init, untrained"] = new_student().eval()

    # 3) vocabulary trimming to the train split's tokens (dev slice included: it is part of the train split)
    vocab_path = work / "vocab.json"
    trimmed: dict[str, TextClassifier] = {}
    vocab = vreport = None
    for name, s in students.items():
        trimmed[name], vocab, vreport = prune_vocabulary(s, tok, train_t.texts, min_count=args.min_count)
    vocab.save(vocab_path, force=True)
    log.info("%s", vreport.summary())
    va_tok = ids_va[ids_va != 0].numpy()
    oov = vocab.old_to_new[va_tok] == vocab.unk_id
    oov_rows = [bool((vocab.old_to_new[r] == vocab.unk_id).any()) for r in unpadded(ids_va)]

    # 4) ONNX FP32 + dynamic INT8; accuracy on the held-out split at batch 1 (cached for --latency-only)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    models: dict[str, tuple[nn.Module, VocabMap | None, bool]] = {TEACHER: (teacher, None, True)}
    for name in ("student layer-drop init, untrained", "student KD", "student CE-only", pruned_name):
        if name in trimmed:
            models[f"{name} (3 layers, vocab-trimmed)"] = (trimmed[name], vocab, True)
    if "student KD" in students:  # what trimming costs in accuracy and saves in size
        models["student KD (3 layers, full vocab)"] = (students["student KD"], None, False)
    val_eval = val.take(args.eval_n, seed=0) if args.eval_n else val
    feeds = unpadded(val_eval.ids)
    labels = val_eval.labels.numpy()
    onnx_dir = work / "onnx"
    onnx_dir.mkdir(exist_ok=True)
    cache_path = onnx_dir / "accuracy_cache.json"  # a rerun after one more student trained redoes only its rows
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    rows: dict[str, dict] = {}
    for name, (m, vm, with_int8) in models.items():
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        key = f"{fingerprint(m)} vocab={vm is not None} rows={len(feeds)} int8={with_int8}"
        variants = {f"{name} FP32": onnx_dir / f"{slug}_fp32.onnx"}
        if with_int8:
            variants[f"{name} INT8-dyn"] = onnx_dir / f"{slug}_int8.onnx"
        hit = cache.get(name)
        if hit and hit["key"] == key and all(p.is_file() for p in variants.values()):
            rows.update({k: hit["rows"][k] for k in variants})
            log.info("%s: accuracy from the cache (same weights)", name)
            continue
        export_onnx(m, variants[f"{name} FP32"], vm)
        if with_int8:
            tmp = onnx_dir / f"{slug}_int8.tmp.onnx"
            quantize_dynamic(str(variants[f"{name} FP32"]), str(tmp), weight_type=QuantType.QInt8)
            os.replace(tmp, variants[f"{name} INT8-dyn"])
        for k, p in variants.items():
            sess = ort_session(p, args.ort_threads)
            t0 = time.perf_counter()
            pred = np.array([int(run_one(sess, f, vm).argmax(1)[0]) for f in feeds])
            rows[k] = {
                "onnx": str(p),
                "vocab_trimmed": vm is not None,
                "onnx_bytes": p.stat().st_size,
                "accuracy": round(float((pred == labels).mean()), 4),
                "eval_seconds": round(time.perf_counter() - t0, 1),
            }
            del sess
            log.info("%s: %s", k, rows[k])
        cache[name] = {"key": key, "rows": {k: rows[k] for k in variants}}
        write_json(cache_path, cache, force=True)
    t_mb, t_acc = rows[f"{TEACHER} FP32"]["onnx_bytes"], rows[f"{TEACHER} FP32"]["accuracy"]
    for k, r in rows.items():
        r["smaller_than_teacher_fp32"] = round(1 - r["onnx_bytes"] / t_mb, 4)
        r["teacher_accuracy_fraction"] = round(r["accuracy"] / t_acc, 4)
        base = k.split(" (")[0]
        if base in train_info and k.endswith("FP32"):
            r["train_seconds"] = train_info[base]["seconds"]
            r["dev_accuracy_best_epoch"] = max(h.get("val_accuracy", 0.0) for h in train_info[base]["history"])

    import onnxruntime as ort

    meta = {
        "benchmark": "distill_minilm",
        "goal": GOAL,
        "teacher": "all-MiniLM-L6-v2, encoder frozen, linear head on mean-pooled L2-normalised embeddings "
        f"(dev accuracy {dev_acc:.4f}); not fine-tuned (CPU budget)",
        "student": "layer_drop_student keep=(0, 2, 4), teacher head as init; encoder + head trained, word "
        "embeddings frozen; dynamic padding; KD and CE-only with the same TrainConfig and seed",
        "student_pruned": f"{pruned_name}: the trained KD student, edgeslim.prune PruneConfig(method='channel', "
        f"ratio={prune_cfg.ratio:g}, importance='l2') removes FFN neurons ({width} -> "
        f"{args.ffn_keep} per layer, physically; still a BertModel), then distill() KD from the "
        "teacher with the same DistillConfig and TrainConfig (word embeddings frozen), "
        "vocab-trimmed like the others",
        "vocab_trimming": {
            "how": "edgeslim.prune.prune_vocabulary(student, tokenizer, train-split texts, min_count="
            f"{args.min_count}) after training (frozen embeddings + every train token kept: same weights as "
            "trimming first); ids remapped by VocabMap (numpy lookup) before the ONNX graph",
            "summary": vreport.summary(),
            "old_size": vreport.old_size,
            "new_size": vreport.new_size,
            "params_before": vreport.params_before,
            "params_after": vreport.params_after,
            "held_out_tokens_mapped_to_unk": round(float(oov.mean()), 4),
            "held_out_texts_with_a_dropped_token": round(float(np.mean(oov_rows)), 4),
            "map": str(vocab_path),
        },
        "kd_config": kd_cfg.to_dict(),
        "train_config": tc.to_dict(),
        "training": {k: dict(d) for k, d in train_info.items()},
        "args": {k: str(v) for k, v in vars(args).items()},
        "data": {
            "train": len(train),
            "dev (best epoch, from the train split)": len(dev),
            "held_out_val": len(val),
            "accuracy_rows": len(val_eval),
            "max_len": args.max_len,
            "students_not_run": [n for n in ("student KD", "student CE-only", pruned_name) if n not in students],
        },
        "rows": rows,
        "accuracy_phase_seconds": round(time.perf_counter() - t_all, 1),
        "accuracy_phase_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
        },
        "latency": None,
        "status": "latency not measured yet (run --latency-only on a quiet host)",
    }
    write_json(manifest_path, meta, force=True)
    if args.skip_latency:
        merge_results(out, meta)
        log.info("wrote %s (no latency)", out)
        return
    measure_latency(meta, args)
    merge_results(out, meta)
    log.info("wrote %s", out)


def measure_latency(meta: dict, args: argparse.Namespace) -> None:
    """ORT batch-1 latency of every row in ``meta['rows']``, interleaved in the same rounds; fills the rows."""
    import onnxruntime as ort

    tok, _ = es.models.load_text("all-minilm-l6-v2")
    _, val_t = es.data.load_text("rotten-tomatoes", seed=0)
    if args.smoke:
        val_t = val_t.take(200)
    ids_va = tokenize(tok, val_t.texts, int(meta["data"]["max_len"]))
    lat = unpadded(TokenSet(ids_va, val_t.labels).take(args.latency_texts, seed=1).ids)
    vocab = VocabMap.load(meta["vocab_trimming"]["map"])
    rows = meta["rows"]
    sessions = {
        k: (ort_session(Path(r["onnx"]), args.ort_threads), vocab if r["vocab_trimmed"] else None)
        for k, r in rows.items()
    }
    load_before = [round(x, 2) for x in os.getloadavg()]

    def turns(s, vm):  # every turn runs the same snippets in the same order: fair on a loaded host
        nxt = itertools.cycle(lat)
        return lambda: run_one(s, next(nxt), vm)

    # 5 warm-up snippets per row, then every round times every row on all the snippets
    res = es.runtime.interleaved_latency(
        {k: turns(s, vm) for k, (s, vm) in sessions.items()}, rounds=args.rounds, runs=len(lat), warmup=5, rewarm=0
    )
    base = f"{TEACHER} FP32"
    t_ms = res[base]["p50_ms"]
    for k, r in rows.items():
        r["latency_p50_ms"] = round(res[k]["p50_ms"], 3)
        r["latency_p90_ms"] = round(res[k]["p90_ms"], 3)
        r["speedup_vs_teacher_fp32"] = round(t_ms / r["latency_p50_ms"], 3)
        r["meets_goal"] = bool(
            r["smaller_than_teacher_fp32"] >= 0.5
            and r["speedup_vs_teacher_fp32"] >= 2.0
            and r["teacher_accuracy_fraction"] >= 0.97
        )
    meta["latency"] = {
        "how": f"ONNX Runtime {ort.__version__} CPUExecutionProvider, intra_op {args.ort_threads} thread(s), batch 1, "
        f"{len(lat)} real held-out snippets at their own length (mean "
        f"{np.mean([f.shape[1] for f in lat]):.1f} tokens), 5 warm-up runs per row, then all {len(rows)} rows "
        f"interleaved in {args.rounds} rounds ({len(lat) * args.rounds} timed runs per row)",
        "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "load_avg_before": load_before,
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
    }
    meta["status"] = (
        "complete"
        if not meta["data"]["students_not_run"]
        else (f"PARTIAL: not trained: {meta['data']['students_not_run']}")
    )
    print(
        f"\n== MiniLM-L6 sentiment, Rotten Tomatoes held-out val ({meta['data']['accuracy_rows']} snippets); "
        f"goal {GOAL}\n{meta['latency']['how']}"
    )
    print(
        f"{'row':56s} {'MB':>6s} {'smaller':>8s} {'p50 ms':>7s} {'p90 ms':>7s} {'speedup':>8s} {'acc':>7s} "
        f"{'of T':>6s} goal"
    )
    for k, r in rows.items():
        print(
            f"{k:56s} {r['onnx_bytes'] / 1e6:6.1f} {r['smaller_than_teacher_fp32'] * 100:7.1f}% "
            f"{r['latency_p50_ms']:7.2f} {r['latency_p90_ms']:7.2f} {r['speedup_vs_teacher_fp32']:7.2f}x "
            f"{r['accuracy']:7.4f} {r['teacher_accuracy_fraction'] * 100:5.1f}% "
            f"{'MET' if r['meets_goal'] else 'missed'}"
        )


if __name__ == "__main__":
    main()
