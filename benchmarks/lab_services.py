"""The services a lab's search runs against, started on 127.0.0.1 for benchmarks/lab_scale.py and
stopped after: a throwaway PostgreSQL (scripts/postgres.sh) holding the Optuna study, the Prefect
server's database and MLflow's backend store; `prefect server start` on PostgreSQL; `mlflow server`
with a database backend (PostgreSQL, or SQLite for the comparison)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} not up after {timeout} s:\n{log.read_text()[-3000:]}")


class Services:
    """Context manager: every process it starts is stopped on exit (process groups, SIGTERM then SIGKILL)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        self.pg_dir: Path | None = None
        self.pg_url: str | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        if self.pg_dir is not None:
            subprocess.run(["bash", str(ROOT / "scripts" / "postgres.sh"), "stop", str(self.pg_dir)], check=False)

    def postgres(self) -> str:
        """PostgreSQL 15 on a free port; returns the URL of its `memcontrol` database."""
        self.pg_dir = self.workdir / "pg"
        out = subprocess.run(["bash", str(ROOT / "scripts" / "postgres.sh"), "start", str(self.pg_dir), str(free_port())],
                             check=True, capture_output=True, text=True).stdout
        self.pg_url = out.strip().splitlines()[-1]
        return self.pg_url

    def database(self, name: str) -> str:
        """A new database on the PostgreSQL server (psycopg URL)."""
        import psycopg

        base = self.pg_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.pg_url.rsplit("/", 1)[0] + f"/{name}"

    def _start(self, name: str, cmd: list[str], env: dict) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / f"{name}.log"
        proc = subprocess.Popen(cmd, env=env, cwd=self.workdir, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def prefect(self, database_url: str) -> str:
        """`prefect server start` with its database on PostgreSQL (asyncpg); returns PREFECT_API_URL."""
        port = free_port()
        env = {**os.environ, "PREFECT_HOME": str(self.workdir / "prefect-home"),
               "PREFECT_API_DATABASE_CONNECTION_URL": database_url.replace("+psycopg", "+asyncpg"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        proc, log = self._start("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                            "--port", str(port), "--no-ui"], env)
        url = f"http://127.0.0.1:{port}/api"
        _wait_http(f"{url}/health", proc, log)
        return url

    def mlflow(self, name: str, backend_uri: str, workers: int = 2) -> str:
        """`mlflow server` with `backend_uri` as its backend store; returns the tracking URI."""
        port = free_port()
        proc, log = self._start(f"mlflow-{name}", [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri,
                                                   "--default-artifact-root", (self.workdir / "mlartifacts").as_uri(),
                                                   "--host", "127.0.0.1", "--port", str(port),
                                                   "--workers", str(workers)], dict(os.environ))
        uri = f"http://127.0.0.1:{port}"
        _wait_http(f"{uri}/health", proc, log)
        return uri
