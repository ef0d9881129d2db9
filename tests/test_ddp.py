"""torchrun + DistributedDataParallel (gloo, CPU): 2 processes give the single-process result."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, TESTS_DIR)
    from tiny import TinyMLP
    from edgeslim.data import load
    from edgeslim.distill import DistillConfig, distill
    from edgeslim.train import TrainConfig

    SEEN = []

    def run():
        train, val = load("digits")
        train, val = train.take(256), val.take(64)
        torch.manual_seed(0)
        teacher, student = TinyMLP(), TinyMLP()
        student.register_forward_pre_hook(lambda m, a: SEEN.append(a[0].shape[0]) if m.training else None)
        cfg = DistillConfig(losses=("kd",), temperature=2.0)
        tc = TrainConfig(epochs=2, lr=0.1, batch_size=32, augment=False, warmup_steps=4)
        return distill(student, teacher, cfg, data=(train, val), train_config=tc, progress=False)

    if __name__ == "__main__":
        out = sys.argv[1]
        if len(sys.argv) > 2:
            dist.init_process_group("gloo")
            model = run()
            if dist.get_rank() == 0:
                torch.save({**model.state_dict(), "train_batch": torch.tensor(max(SEEN))}, out)
            dist.destroy_process_group()
        else:
            model = run()
            torch.save({**model.state_dict(), "train_batch": torch.tensor(max(SEEN))}, out)
    """
)


def test_two_process_ddp_matches_single_process(tmp_path: Path):
    tests = str(Path(__file__).parent)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.replace("TESTS_DIR", repr(tests)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, ddp = tmp_path / "single.pt", tmp_path / "ddp.pt"
    subprocess.run([sys.executable, str(script), str(single)], check=True, env=env, timeout=120)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(ddp),
            "ddp",
        ],
        env=env,
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(single, weights_only=True), torch.load(ddp, weights_only=True)
    assert a.keys() == b.keys()
    # each rank really trained on its half of every global batch of 32
    assert int(a.pop("train_batch")) == 32 and int(b.pop("train_batch")) == 16
    moved = 0.0
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3)
        moved += float((a[k] - b[k]).abs().max())
    assert moved < 1e-3
