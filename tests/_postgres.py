"""A throw-away PostgreSQL server for tests and benchmarks (Debian's ``postgresql`` package).

    with PostgresServer.start() as pg:            # raises NoPostgres(reason) when none can be started
        url = pg.new_database("workers")           # postgresql://edgeslim@127.0.0.1:<port>/workers

``initdb`` into a fresh temporary folder, ``postgres`` listening on 127.0.0.1 on a free port only (no Unix socket
outside that folder), trust authentication for the local superuser ``edgeslim``, durability off (fsync,
synchronous commit: a test server loses nothing it needs). PostgreSQL refuses to run as root: as root the
binaries run as the ``postgres`` system user (``runuser``), which owns the folder. :meth:`PostgresServer.stop`
stops the server (immediate shutdown) and removes the folder; it also runs at interpreter exit, so a failing test
session does not leave a server behind.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

SUPERUSER = "edgeslim"


class NoPostgres(RuntimeError):
    """No PostgreSQL server could be started here; the message says why."""


def find_bin() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: ``$EDGESLIM_PG_BIN``, Debian's newest
    ``/usr/lib/postgresql/<version>/bin``, or the ``PATH``."""
    cands = [os.environ["EDGESLIM_PG_BIN"]] if os.environ.get("EDGESLIM_PG_BIN") else []
    cands += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    which = shutil.which("pg_ctl")
    if which:
        cands.append(str(Path(which).parent))
    for c in cands:
        if (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One running throw-away server (see the module docstring)."""

    def __init__(self, bindir: Path, root: Path, port: int, as_user: str | None) -> None:
        self.bindir, self.root, self.port, self.as_user = bindir, root, port, as_user
        self.data = root / "data"
        self.log = root / "server.log"
        self.running = False

    # ------------------------------------------------------------------------------------------ life
    @classmethod
    def start(cls, timeout: float = 60.0) -> PostgresServer:
        """initdb + start; raises :class:`NoPostgres` with the reason when that cannot be done here."""
        bindir = find_bin()
        if bindir is None:
            raise NoPostgres(
                "no PostgreSQL server binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin or on "
                "PATH: install Debian's postgresql package (make test does: apt-get install postgresql)"
            )
        as_user = None
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise NoPostgres(
                    "running as root and there is no 'postgres' system user to run the server as "
                    "(Debian's postgresql package creates it)"
                ) from None
            if shutil.which("runuser") is None:
                raise NoPostgres(
                    "running as root and runuser (util-linux) is missing: cannot run the server as the 'postgres' user"
                )
            as_user = "postgres"
        root = Path(tempfile.mkdtemp(prefix="edgeslim-pg-"))
        srv = cls(bindir, root, _free_port(), as_user)
        atexit.register(srv.stop)
        try:
            if as_user:
                pw = pwd.getpwnam(as_user)
                os.chown(root, pw.pw_uid, pw.pw_gid)
            srv._run(
                ["initdb", "-D", str(srv.data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-sync"],
                timeout=timeout,
            )
            for attempt in range(3):  # the free port may be taken between choosing and binding it
                try:
                    srv._pg_ctl_start(timeout)
                    break
                except NoPostgres:
                    if attempt == 2:
                        raise
                    srv.port = _free_port()
        except BaseException:
            srv.stop()
            raise
        return srv

    def _pg_ctl_start(self, timeout: float) -> None:
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='{self.data}' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
        )
        self._run(
            ["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", str(int(timeout)), "start"],
            timeout=timeout + 10,
        )
        self.running = True

    def stop(self) -> None:
        """Stop the server (immediate shutdown) and remove its folder; safe to call twice."""
        if self.running:
            self.running = False
            try:
                self._run(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop"], timeout=60)
            except NoPostgres:
                pass  # the folder goes anyway; a server whose folder is gone shuts itself down
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ use
    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def new_database(self, name: str) -> str:
        """Create database ``name`` (lower case letters, digits, underscores); returns its URL."""
        if not name.replace("_", "").isalnum() or name.lower() != name:
            raise ValueError(f"database name {name!r}: use lower case letters, digits and underscores")
        self._run(["createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name], timeout=60)
        return self.url(name)

    def _run(self, cmd: list[str], timeout: float) -> str:
        argv = [str(self.bindir / cmd[0]), *cmd[1:]]
        if self.as_user:
            argv = ["runuser", "-u", self.as_user, "--", *argv]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=self.root)
        except subprocess.TimeoutExpired:
            raise NoPostgres(f"{cmd[0]} did not finish within {timeout:.0f} s{self._log_tail()}") from None
        if r.returncode != 0:
            why = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise NoPostgres(f"{cmd[0]} failed (exit {r.returncode}): {why[0]}{self._log_tail()}")
        return r.stdout

    def _log_tail(self) -> str:
        try:
            lines = self.log.read_text().strip().splitlines()
        except OSError:
            return ""
        return f"; server log: {lines[-1]}" if lines else ""


def optimize_process(*args: str, paths: list[str]) -> subprocess.Popen:
    """``edgeslim optimize ARGS`` in a new process (one worker of a shared study), 1 thread, ``paths`` first on its
    PYTHONPATH; stdout and stderr captured as text."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "edgeslim.cli", "optimize", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
