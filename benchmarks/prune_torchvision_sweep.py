"""Sweep: structured pruning (30% of channels, l1, widths rounded to 8) of every torchvision classification
constructor (weights=None), then forward pass, ONNX export and an ONNX Runtime run checked against torch.

Each model runs in its own subprocess with a limit on its CPU time (--timeout, --heavy-timeout; wall time is
only a backstop, so a shared host that pauses or starves the worker does not fail it); a failure is recorded
with the error edgeslim raised (which names the module). The denominator is every constructor
torchvision.models.list_models(module=torchvision.models) returns. Each model gets the smallest input it accepts (64 px; 224 px where fixed-size
position embeddings / partition grids demand it), so tracing and export stay fast. Prints a table, writes
benchmarks/results/prune_torchvision_sweep.json.

    PYTHONPATH=src python benchmarks/prune_torchvision_sweep.py [--only resnet18,vgg11] [--timeout 300]
    PYTHONPATH=src python benchmarks/prune_torchvision_sweep.py --resume --retry-failed   # redo failures only
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIG_INPUT = ("vit_", "maxvit")  # fixed-size position embeddings / 7x7 partition grid at every stage: 224 px


def one(name: str) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch
    import torchvision

    sys.path.insert(0, str(ROOT / "src"))
    from edgeslim.core.errors import EdgeslimError
    from edgeslim.prune import PruneConfig, prune

    torch.manual_seed(0)
    size = 224 if name.startswith(BIG_INPUT) else (96 if name.startswith(("inception", "googlenet")) else 64)
    size = 112 if name.startswith("swin") else size  # 7x7 windows: 112 px keeps the last stage one window
    row: dict = {"model": name, "input": size, "stage": "build"}
    t0 = time.perf_counter()
    try:
        m = torchvision.models.get_model(name, weights=None).eval()
        # a zero-initialised classifier (torchvision ViT heads) makes every output 0 and the ONNX comparison vacuous
        zero = [
            n
            for n, mod in m.named_modules()
            if isinstance(mod, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) and not mod.weight.any()
        ]
        with torch.no_grad():
            for n in zero:
                m.get_submodule(n).weight.normal_(0, 0.02)
        if zero:
            row["reinit_zero_layers"] = zero
        x = torch.randn(1, 3, size, size)
        row["stage"] = "prune"
        p = prune(m, PruneConfig(method="channel", ratio=0.3, importance="l1"), example_inputs=x)
        rep = p.prune_report
        row.update(
            params_before=rep.params_before,
            params_after=rep.params_after,
            macs_before=rep.macs_before,
            macs_after=rep.macs_after,
            prune_seconds=rep.seconds,
            kept_unpruned=len(rep.skipped),
        )
        if rep.skipped:
            row["kept_unpruned_example"] = next(iter(rep.skipped.items()))
        if rep.params_after >= rep.params_before:
            raise EdgeslimError("nothing was pruned")
        row["stage"] = "onnx export"
        with torch.no_grad():
            ref = p(x)
        ref = ref if isinstance(ref, torch.Tensor) else ref[0]
        row["out_abs_max"] = float(ref.abs().max())
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "m.onnx"
            try:
                torch.onnx.export(p, (x,), str(path), dynamo=False, input_names=["x"], opset_version=17)
                row["exporter"] = "legacy"
            except Exception as e:  # noqa: BLE001 - try the dynamo exporter before giving up
                try:
                    torch.onnx.export(p, (x,), str(path), dynamo=True, input_names=["x"])
                    row["exporter"] = "dynamo"
                except Exception as e2:  # noqa: BLE001
                    raise EdgeslimError(
                        f"ONNX export of the pruned model failed (legacy: {str(e).splitlines()[0][:150]}; "
                        f"dynamo: {str(e2).splitlines()[0][:150]})"
                    ) from None
            row["stage"] = "onnxruntime"
            got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
        err = float(np.abs(got - ref.numpy()).max() / (np.abs(ref.numpy()).max() + 1e-12))
        row["onnx_rel_err"] = err
        if err > 1e-3:
            raise EdgeslimError(f"ONNX Runtime output differs from torch (relative max error {err:.2e})")
        row["ok"] = True
        row["stage"] = "done"
    except EdgeslimError as e:
        row.update(ok=False, error=f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - a crash we did not turn into a clear error: recorded as such
        row.update(ok=False, error=f"UNHANDLED {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--only")
    ap.add_argument("--timeout", type=int, default=300, help="CPU seconds a model may use")
    ap.add_argument("--heavy-timeout", type=int, default=900, help="CPU seconds for the largest models")
    ap.add_argument("--retry-failed", action="store_true", help="with --resume: run failed models again")
    ap.add_argument("--resume", action="store_true", help="skip models already in --out")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prune_torchvision_sweep.json"))
    args = ap.parse_args()
    if args.one:
        row = one(args.one)
        Path(args.out).write_text(json.dumps(row))
        return
    import torch
    import torchvision

    every = sorted(torchvision.models.list_models(module=torchvision.models))  # the denominator
    names = args.only.split(",") if args.only else list(every)
    heavy = (
        "densenet",
        "_b5",
        "_b6",
        "_b7",
        "v2_l",
        "v2_m",
        "128gf",
        "32gf",
        "16gf",
        "vit_h",
        "vit_l",
        "large",
        "swin_b",
        "swin_v2_b",
        "base",
        "101",
        "152",
        "wide",
        "vgg19",
        "vgg16",
    )
    last = ("vit_h_14",)  # the largest (632 M parameters at 224 px): last, so a cut-short sweep loses only it
    names.sort(key=lambda n: (n in last, any(h in n for h in heavy)))  # cheap first; a cut-short sweep still says a lot
    rows: list[dict] = []
    out = Path(args.out)
    if args.resume and out.is_file():  # keep finished rows of an interrupted sweep
        rows = [
            r
            for r in json.loads(out.read_text())["rows"]
            if r["model"] in every
            and (r.get("ok") or not args.retry_failed)
            and not (args.only and r["model"] in names)
        ]
    done = {r["model"] for r in rows}
    for name in names:
        if name in done:
            continue
        t0 = time.perf_counter()
        res = Path(tempfile.mkdtemp()) / "row.json"
        limit = args.heavy_timeout if any(h in name for h in heavy) else args.timeout
        try:  # the limit is CPU seconds of the worker (a shared host may pause or starve it), wall time a backstop
            cp = subprocess.run(
                [sys.executable, __file__, "--one", name, "--out", str(res)],
                capture_output=True,
                text=True,
                timeout=3 * limit + 1800,
                preexec_fn=lambda lim=limit: resource.setrlimit(resource.RLIMIT_CPU, (lim, lim + 30)),
                env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
            )
            if res.is_file():
                row = json.loads(res.read_text())
            elif cp.returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
                row = {"model": name, "ok": False, "error": f"timed out: more than {limit} s of CPU time (1 thread)"}
            elif cp.returncode == -signal.SIGKILL:
                row = {
                    "model": name,
                    "ok": False,
                    "error": f"killed: past {limit + 30} s of CPU time, or out of memory",
                }
            else:
                row = {
                    "model": name,
                    "ok": False,
                    "error": f"worker died (rc {cp.returncode}): {cp.stderr.strip()[-300:]}",
                }
        except subprocess.TimeoutExpired:
            row = {
                "model": name,
                "ok": False,
                "error": f"timed out after {3 * limit + 1800} s of wall time on this host",
            }
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        status = "ok" if row.get("ok") else "FAIL " + row.get("error", "")[:150]
        print(f"{name:28s} {row['wall_s']:6.1f}s {status}", flush=True)
        _write(out, rows, len(every), torch.__version__, torchvision.__version__)
    ok, unhandled = _write(out, rows, len(every), torch.__version__, torchvision.__version__)
    print(
        f"\n{ok} of {len(every)} ({len(rows)} tried) torchvision classification models pruned (30% channels), exported and matched in "
        f"ONNX Runtime; {len(unhandled)} failures were not clear edgeslim errors: {unhandled}"
    )


def _write(out: Path, rows: list[dict], planned: int, torch_v: str, tv_v: str) -> tuple[int, list[str]]:
    ok = sum(r.get("ok", False) for r in rows)
    unhandled = [r["model"] for r in rows if "UNHANDLED" in r.get("error", "") or "worker died" in r.get("error", "")]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "prune_torchvision_sweep",
                "succeeded": ok,
                "total": planned,
                "tried": len(rows),
                "failed": {r["model"]: r.get("error", "") for r in rows if not r.get("ok")},
                "unhandled": unhandled,
                "comparison": "Torch-Pruning 1.6 reports 77 of 85 torchvision models (90.6%)",
                "settings": {
                    "ratio": 0.3,
                    "importance": "l1",
                    "round_to": 8,
                    "weights": None,
                    "onnx": "legacy exporter (opset 17), dynamo exporter if legacy fails",
                },
                "host": {
                    "python": platform.python_version(),
                    "torch": torch_v,
                    "torchvision": tv_v,
                    "note": "shared, loaded 2-core host; one model per subprocess",
                },
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    return ok, unhandled


if __name__ == "__main__":
    main()
