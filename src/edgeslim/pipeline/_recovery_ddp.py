"""A trial's recovery (fine-tune or distillation from the input model) run as ``torchrun`` DDP processes (gloo, CPU).

With ``Space.recovery_processes = N > 1`` the parent trial starts
``python -m torch.distributed.run --standalone --nproc_per_node N -m edgeslim.pipeline._recovery_ddp JOB``:

- the job file names what the ranks read: the pruned model (the pruning step's recipe in the step cache), the input
  model and the training split (pickled once per run under ``cache/ddp-<key>/``: a recipe replays on an instance of
  the input model's class, which the ranks get from that pickle), the TrainConfig and step cap, and the absolute
  wall-clock deadline;
- every rank trains its shard of each global batch (``edgeslim.train.fit`` / ``edgeslim.distill`` under an
  initialised process group) with ``OMP_NUM_THREADS = Budget.threads // N`` (at least 1);
- before every optimizer step the ranks agree (an all-reduce of "past the deadline") whether to stop, so all of them
  stop at the same step and none waits in a collective for a rank that left;
- rank 0 writes the recovered model as a recipe into the step's cache folder (atomically) and ``result.json``
  (world size, the step it stopped at, if any); a rank that fails writes its error as one line.

The parent waits at most until the deadline plus :data:`MARGIN_S` (without a deadline: until the ranks end), then
stops the launcher (SIGTERM: torchrun ends its ranks, each in a session of its own) and kills its process group; a
rank whose launcher is gone, or that is still running :data:`MARGIN_S` after the deadline, exits by itself. A failure
becomes one line with the failing rank's error (or the launcher's output tail). The job files are removed either
way; nothing of a stopped or failed recovery is cached.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: seconds the parent waits past the deadline for the ranks to stop (start-up, one step, teardown) before it kills them
MARGIN_S = 60.0
#: seconds the launcher is given to end its ranks after SIGTERM, before its process group is killed
TERM_WAIT_S = 10.0
#: the launcher output lines kept for an error message
TAIL_LINES = 40


def shared_inputs(ctx: Any) -> Path:
    """The run's pickled input model and training split for the ranks (written once per model+data key)."""
    from edgeslim.core.errors import ModelError
    from edgeslim.core.io import save_torch
    from edgeslim.pipeline._store import Cache

    with ctx.cache.claim("ddp", ctx.base_key) as d:
        if Cache.done(d):
            return d
        train = copy.copy(ctx.train)
        if getattr(train, "_cache", None) is not None:  # the normalised float copy is rebuilt by the ranks
            train._cache = None
        try:
            save_torch(ctx.base, d / "base.pt", force=True)
        except Exception as e:  # noqa: BLE001 - pickling fails in many ways (local classes, lambdas, hooks)
            raise ModelError(
                f"Space.recovery_processes={ctx.space.recovery_processes}: the input model "
                f"({type(ctx.base).__name__}) cannot be sent to the recovery processes ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e) else ''}); define its class at module level of an "
                "importable module, or set recovery_processes: 1"
            ) from None
        save_torch(train, d / "train.pt", force=True)
        Cache.finish(d, {"model_class": type(ctx.base).__name__, "train": f"{train.name}/{train.split}"})
        return d


def recover_ddp(
    ctx: Any, step_dir: Path, source: Path, how: str, tcfg: Any, cap: int, n: int
) -> tuple[nn.Module | None, int | None, dict[str, Any]]:
    """Recover the model saved at ``source`` (a step recipe) in ``n`` torchrun processes; rank 0 writes it to
    ``step_dir/model.recipe``. Returns (the model, or None when stopped; the step the deadline stopped it at, or
    None; the run's record: world size, threads per process)."""
    from edgeslim.core.io import write_json
    from edgeslim.pipeline._candidate import load_step

    if not source.is_file():
        raise RuntimeError(f"{how} in {n} torchrun processes: the pruned model's cached recipe {source} is missing")
    inputs = shared_inputs(ctx)
    job_dir = step_dir / "ddp-job"
    shutil.rmtree(job_dir, ignore_errors=True)
    job_dir.mkdir(parents=True)
    threads = max(1, int(ctx.budget.threads) // n)
    deadline = None if ctx.deadline is None else time.time() + (ctx.deadline - time.perf_counter())
    out = step_dir / "model.recipe"
    out.unlink(missing_ok=True)
    job = {
        "base": str(inputs / "base.pt"),
        "train": str(inputs / "train.pt"),
        "source": str(source),
        "output": str(out),
        "result": str(job_dir / "result.json"),
        "errors": str(job_dir),
        "how": how,
        "train_config": tcfg.to_dict(),
        "cap": cap,
        "deadline": deadline,
        "threads": threads,
    }
    write_json(job_dir / "job.json", job, force=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    paths = [p for p in sys.path if p] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))  # the ranks import what this process imports
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(n),
        "-m",
        __name__,
        str(job_dir / "job.json"),
    ]
    what = f"{how} in {n} torchrun processes"
    t0 = time.perf_counter()
    try:
        with open(job_dir / "log.txt", "wb") as logf:
            proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                timeout = None if deadline is None else max(0.0, deadline - time.time()) + MARGIN_S
                try:
                    rc = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    _kill(proc)
                    raise RuntimeError(
                        f"{what} did not stop within {MARGIN_S:g} s of the run's deadline; killed them "
                        f"(last output: {_tail(job_dir)})"
                    ) from None
            finally:
                if proc.poll() is None:  # interrupted (Ctrl-C) or failed while waiting: no rank outlives the trial
                    _kill(proc)
        if rc != 0:
            raise RuntimeError(f"{what} failed (exit {rc}): {_rank_error(job_dir) or _tail(job_dir)}")
        res_file = job_dir / "result.json"
        if not res_file.is_file():
            raise RuntimeError(f"{what} exited without a result: {_tail(job_dir)}")
        res = json.loads(res_file.read_text())
        rec = {
            "processes": res["world_size"],
            "threads_per_process": threads,
            "ddp_seconds": round(time.perf_counter() - t0, 2),
        }
        if res.get("stopped_at") is not None:
            out.unlink(missing_ok=True)
            return None, int(res["stopped_at"]), rec
        return load_step(ctx.base, out), None, rec
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)


def _kill(proc: subprocess.Popen) -> None:
    """Stop the launcher and its ranks: SIGTERM to the launcher (torchrun then ends every rank, each in a session of
    its own), then SIGKILL to the launcher's process group; a rank left orphaned exits by itself (:func:`_watchdog`)."""
    try:
        proc.terminate()
        proc.wait(timeout=TERM_WAIT_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _rank_error(job_dir: Path) -> str:
    """The first rank error recorded (rank 0 first), one line."""
    for f in sorted(job_dir.glob("error-rank*.txt"), key=lambda p: int(p.stem.removeprefix("error-rank"))):
        text = f.read_text().strip()
        if text:
            return f"rank {f.stem.removeprefix('error-rank')}: {text.splitlines()[0][:240]}"
    return ""


def _tail(job_dir: Path) -> str:
    """The last line of the launcher's output that names an error (else its last line), one line."""
    try:
        lines = [x.strip() for x in (job_dir / "log.txt").read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no output"
    lines = lines[-TAIL_LINES:]
    named = [x for x in lines if "Error" in x or "error:" in x]
    return ((named or lines or ["no output"])[-1])[:240]


# ---------------------------------------------------------------------------------------------- a rank
def _main(job_path: str) -> int:
    import torch.distributed as dist

    job = json.loads(Path(job_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    threading.Thread(target=_watchdog, args=(job["deadline"],), daemon=True).start()
    try:
        torch.set_num_threads(int(job["threads"]))
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        _run(job, dist)
        dist.destroy_process_group()
    except BaseException as e:
        text = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        (Path(job["errors"]) / f"error-rank{rank}.txt").write_text(text + "\n")
        raise
    return 0


def _watchdog(deadline: float | None) -> None:
    """End this rank when its launcher is gone (killed: nobody would read its result, and its peers may be gone) or
    when it is still running :data:`MARGIN_S` after the deadline (the parent kills it then anyway)."""
    parent = os.getppid()
    while True:
        time.sleep(1.0)
        if os.getppid() != parent or (deadline is not None and time.time() > deadline + MARGIN_S):
            os._exit(3)


def _run(job: dict[str, Any], dist: Any) -> None:
    from edgeslim.core.io import write_json
    from edgeslim.pipeline._candidate import load_step, recover, save_step
    from edgeslim.train import TrainConfig

    base = torch.load(job["base"], map_location="cpu", weights_only=False).eval()
    train = torch.load(job["train"], map_location="cpu", weights_only=False)
    model = load_step(base, Path(job["source"]))
    tcfg = TrainConfig.from_dict(job["train_config"])
    deadline = job["deadline"]

    def stop() -> bool:  # asked by every rank before every step: all stop at the same one
        flag = torch.tensor([1 if time.time() >= deadline else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    t0 = time.perf_counter()
    tuned, stopped_at = recover(
        base, train, model, job["how"], tcfg, int(job["cap"]), stop if deadline is not None else None
    )
    if dist.get_rank() == 0:
        if stopped_at is None:
            save_step(tuned, Path(job["output"]))
        write_json(
            job["result"],
            {
                "world_size": dist.get_world_size(),
                "stopped_at": stopped_at,
                "seconds": round(time.perf_counter() - t0, 2),
            },
            force=True,
        )
    dist.barrier()  # the parent reads rank 0's files once every rank is done


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(_main(sys.argv[1]))
