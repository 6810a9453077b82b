"""Real servers for the tests, each on a loopback port in a temporary folder of its own, stopped whatever happens:
an MLflow tracking server (SQLite backend) and a PostgreSQL server (initdb + pg_ctl)."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 180  # a cold start of `mlflow server` imports for half a minute on a busy machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGKILL to the server's process group (it was started in a session of its own): its data is thrown away,
    so a clean shutdown, seconds of it, buys nothing."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=15)


@contextlib.contextmanager
def mlflow_server(folder: Path):
    """`mlflow server` with an SQLite backend and proxied artifacts under folder; yields its http:// URI."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (folder / "server.log").open("w")
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{(folder / 'server.log').read_text()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                log_text = (folder / "server.log").read_text()
                raise RuntimeError(f"mlflow server not up after {START_TIMEOUT_S} s:\n{log_text}")
            time.sleep(0.25)
        yield uri
    finally:
        _stop(proc)
        log.close()


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server's bin folder (Debian's layout), 15 preferred; None when none is installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    preferred = [p for p in found if Path(p).parts[-3] == "15"]
    return Path((preferred or found)[-1]).parent if found else None


@contextlib.contextmanager
def postgres_server(database: str):
    """A PostgreSQL server on a loopback port with `database` created in it; yields its postgresql:// URL.

    initdb refuses to run as root: a root process runs the server's commands as the postgres user (runuser), in a
    folder of /tmp that it owns (pytest's temporary folders are private to root)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL server found under /usr/lib/postgresql/*/bin: apt-get install postgresql "
                           "(.ci/run does)")
    base = Path(tempfile.mkdtemp(prefix="pg-test-"))
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", free_port()

    def run(*cmd):
        out = subprocess.run([*as_user, *map(str, cmd)], capture_output=True, text=True, timeout=120)
        if out.returncode:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout}{out.stderr}")

    started = False
    try:
        run(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-sync")
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        run(bin_dir / "pg_ctl", "-D", data, "-l", base / "server.log", "-o", options, "-w", "-t", "60", "start")
        started = True
        run(bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", database)
        yield f"postgresql://postgres@127.0.0.1:{port}/{database}"
    finally:
        if started:
            with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
                run(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)
