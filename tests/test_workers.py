"""edgeslim optimize spread over workers: a real PostgreSQL server (tests/_postgres.py, the `postgres` fixture),
two `edgeslim optimize --resume RUN --worker` processes sharing the study a first command started, a worker killed
with SIGKILL mid-trial whose trial the other picks up, and the bad-input paths of --storage / --worker."""

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from _postgres import optimize_process

from edgeslim.core.io import save_torch
from edgeslim.pipeline import Space

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent

# PTQ only (16 candidates: per-channel x calibration x CLE x bias correction): no training, about a second a trial
PTQ = Space(
    drop_blocks=(0,),
    target_macs=(0.0,),
    keep_early_layers=(False,),
    round_to=1,
    quantize=(True,),
    calibration=("minmax", "mse"),
    calib_samples=128,
    cheap_trials=2,
    search_samples=300,
    latency_runs=20,
)
HEARTBEAT = 2  # seconds; a worker silent for 3 heartbeats is taken as dead


def _cli(*args: str) -> subprocess.Popen:
    return optimize_process(*args, paths=[str(SRC), str(TESTS)])


def _start_run(tmp_path: Path, digits_model, url: str, n: int) -> Path:
    """Start a run on the shared storage (the model, data, budget, space and trial budget on the command line) and
    stop it at once (--minutes ~0: the baseline is measured, no trial run), so that the two workers the tests start
    next join it at the same moment."""
    model, *_ = digits_model
    weights = save_torch(model.state_dict(), tmp_path / "tiny.pt")
    space = tmp_path / "space.yaml"
    space.write_text(PTQ.to_yaml())
    out = tmp_path / "run"
    starter = _cli(
        "tiny:TinyCNN",
        "--weights",
        str(weights),
        "--dataset",
        "digits",
        "--space",
        str(space),
        "--max-drop",
        "3",
        "--threads",
        "1",
        "--trials",
        str(n),
        "--storage",
        url,
        "--out",
        str(out),
        "--heartbeat",
        str(HEARTBEAT),
        "--minutes",
        "0.0001",
        "--json",
    )
    got = _finish(starter)
    assert got["trials"]["complete"] == 0 and got["recipe"]["trial"] is None  # nothing run yet: the input model
    return out


def _workers(out: Path, k: int) -> list[subprocess.Popen]:
    return [_cli("--resume", str(out), "--worker", "--json") for _ in range(k)]


def _trials(url: str) -> list:
    import optuna

    name = next(n for n in optuna.get_all_study_names(url) if n.startswith("edgeslim-"))
    return optuna.load_study(study_name=name, storage=url).get_trials()


def _finish(p: subprocess.Popen, timeout: float = 120) -> dict:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}: {err[-3000:]}"
    return json.loads(out)


def _check_study(url: str, n: int) -> list:
    """No duplicated candidate, no lost trial, figures on every completed trial; returns the trials."""
    trials = _trials(url)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == n  # the shared budget: exactly n, none lost, none run past it
    keys = [json.dumps(t.user_attrs["params"], sort_keys=True) for t in done]
    assert len(set(keys)) == n  # no candidate run twice
    assert all(
        t.user_attrs["figures"]["latency_ms"] > 0
        and 0 < t.user_attrs["figures"]["accuracy"] <= 1
        and t.values == [t.user_attrs["figures"]["accuracy"], t.user_attrs["figures"]["latency_ms"]]
        for t in done
    )
    assert not [t for t in trials if t.state.name == "RUNNING"]
    # a trial pruned as a duplicate points at a different trial with the same candidate
    for t in trials:
        if "duplicate_of" in t.user_attrs:
            assert trials[t.user_attrs["duplicate_of"]].user_attrs["params"] == t.user_attrs["params"]
    return trials


def test_two_workers_share_a_postgres_study_with_no_duplicate_or_lost_trial(digits_model, postgres, tmp_path):
    url = postgres.new_database("two_workers")
    n = 10
    out = _start_run(tmp_path, digits_model, url, n)
    procs = _workers(out, 2)  # the same machine and folder, two processes
    results = [_finish(p) for p in procs]
    trials = _check_study(url, n)
    by = {t.user_attrs.get("worker") for t in trials if t.state.name == "COMPLETE"}
    host = socket.gethostname()
    assert by == {f"{host}:{p.pid}" for p in procs}  # both ran trials
    # each wrote the report from the whole study (one after the other); the last one is on disk
    for got in results:
        assert got["trials"]["complete"] == n and got["meets_budget"] is True
    doc = json.loads((out / "report.json").read_text())
    assert doc["trials"]["complete"] == n and set(doc["trials"]["workers"]) == by
    assert doc["study"]["storage"] == url
    rec = json.loads((out / "run.json").read_text())
    assert rec["storage"] == url and rec["command"]["model"] == "tiny:TinyCNN" and rec["command"]["trials"] == n
    # the shared step cache: every candidate built once (+ the FP32 baseline every process needed)
    assert len(list((out / "cache").glob("candidate-*/done.json"))) == n + 1


def test_a_sigkilled_workers_running_trial_is_picked_up_by_the_other(digits_model, postgres, tmp_path):
    url = postgres.new_database("killed_worker")
    n = 8
    out = _start_run(tmp_path, digits_model, url, n)
    survivor, victim = _workers(out, 2)
    me = f"{socket.gethostname()}:{victim.pid}"
    deadline = time.time() + 90
    killed = None
    while killed is None:
        assert victim.poll() is None, f"the worker ended before it was killed: {victim.communicate()[1][-2000:]}"
        assert time.time() < deadline, "the worker ran no trial within 90 s"
        running = [
            t
            for t in _trials(url)
            if t.state.name == "RUNNING"
            and t.user_attrs.get("worker") == me
            and "params" in t.user_attrs
            and "duplicate_of" not in t.user_attrs
        ]
        if running:
            victim.send_signal(signal.SIGSTOP)  # frozen: check the trial is still running, then kill
            still = [t for t in _trials(url) if t.number == running[0].number and t.state.name == "RUNNING"]
            if still:
                victim.send_signal(signal.SIGKILL)
                killed = running[0]
            else:
                victim.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    victim.wait()
    got = _finish(survivor, timeout=150)
    trials = _check_study(url, n)
    lost = trials[killed.number]
    assert lost.state.name == "FAIL" and lost.user_attrs.get("worker") == me  # failed by the heartbeat check
    retry = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].user_attrs["params"] == killed.user_attrs["params"]
    assert retry[0].user_attrs["worker"] == f"{socket.gethostname()}:{survivor.pid}"
    assert got["trials"]["complete"] == n and got["trials"]["worker_lost"] == [killed.number]
    row = next(
        r for r in json.loads((out / "report.json").read_text())["trials"]["rows"] if r["number"] == killed.number
    )
    assert row["worker_lost"] is True and row["state"] == "fail"
    assert "stopped answering; re-queued" in (out / "report.md").read_text()


def test_storage_that_does_not_answer_is_one_line_exit_2_and_writes_nothing(
    digits_model, tmp_path, capsys, monkeypatch
):
    from edgeslim.cli import main

    model, *_ = digits_model
    weights = save_torch(model.state_dict(), tmp_path / "tiny.pt")
    monkeypatch.syspath_prepend(str(TESTS))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    code = main(
        [
            "optimize",
            "tiny:TinyCNN",
            "--weights",
            str(weights),
            "--dataset",
            "digits",
            "--trials",
            "1",
            "--storage",
            f"postgresql://bob:s3cret@127.0.0.1:{port}/opt",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "does not answer" in err and f"postgresql://bob:***@127.0.0.1:{port}/opt" in err and "s3cret" not in err
    assert not out.exists()


def test_worker_and_resume_from_the_record_refuse_what_they_cannot_do(digits_model, tmp_path, capsys, monkeypatch):
    from edgeslim.cli import main

    model, *_ = digits_model
    weights = save_torch(model.state_dict(), tmp_path / "tiny.pt")
    space = tmp_path / "space.yaml"
    space.write_text(PTQ.replace(cheap_trials=1).to_yaml())
    monkeypatch.syspath_prepend(str(TESTS))
    out = tmp_path / "run"
    assert (
        main(
            [
                "optimize",
                "tiny:TinyCNN",
                "--weights",
                str(weights),
                "--dataset",
                "digits",
                "--space",
                str(space),
                "--target",
                "jetson-orin-nano",
                "--max-drop",
                "3",
                "--trials",
                "1",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    capsys.readouterr()
    # a run in its own study.db: no worker can join it
    assert main(["optimize", "--resume", str(out), "--worker"]) == 2
    assert "keeps its study in its own study.db" in capsys.readouterr().err
    # options that would change the run are refused, naming them
    assert main(["optimize", "--resume", str(out), "--worker", "--max-drop", "2", "--trials", "3"]) == 2
    assert "drop --max-drop, --trials" in capsys.readouterr().err
    assert main(["optimize", "--worker"]) == 2
    assert "--worker joins a run: give its folder, --resume RUN" in capsys.readouterr().err
    assert main(["optimize", "--resume", str(tmp_path / "none"), "--worker"]) == 2
    assert "run.json' not found" in capsys.readouterr().err
    # --resume RUN without a model continues the run with the options it was started with (here: all done)
    assert main(["optimize", "--resume", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["trials"]["complete"] == 1 and got["meets_budget"] is True
    # another storage than the run's: refused before anything runs
    assert main(["optimize", "--resume", str(out), "--storage", "sqlite:///" + str(tmp_path / "x.db")]) == 2
    assert "holds a run whose study is in the folder's own study.db" in capsys.readouterr().err


def test_postgres_fixture_listens_on_loopback_only(postgres):
    import psycopg

    url = postgres.new_database("probe")
    with psycopg.connect(url) as con:
        addr = con.execute("show listen_addresses").fetchone()[0]
        assert addr == "127.0.0.1"
        assert con.execute("select current_user").fetchone()[0] == "edgeslim"


def test_space_presets_and_unknown_names():
    from edgeslim.core.errors import ConfigError
    from edgeslim.pipeline._space import space_from

    ptq = space_from("ptq")
    cands = ptq.all_candidates()
    assert cands and all(c["target_macs"] == 0 and c["quantize"] for c in cands)  # PTQ variants only, no training
    assert len(cands) == 2 * 3 * 2 * 2  # per-channel x calibration x CLE x bias correction
    with pytest.raises(ConfigError, match=r"space 'ptqq' is neither a YAML file nor a preset \(presets: ptq, full\)"):
        space_from("ptqq")
