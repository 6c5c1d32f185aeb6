"""A micro workdir (tests/micro_params.yaml) prepared by the library up to the search (prepare,
base, reference), and `memcontrol <command>` run on one through the real CLI and Prefect flow, each
with its own Prefect home. Shared by the determinism and fault-injection tests."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "_time", "timing")  # a column whose name holds one of these measures the clock


def prepared(work: Path) -> Path:
    from memcontrol.base_model import base
    from memcontrol.config import load_params
    from memcontrol.prepare import prepare
    from memcontrol.reference import reference
    from memcontrol.workdir import Layout

    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "tests" / "micro_params.yaml", work / "params.yaml")
    params, layout = load_params(work / "params.yaml"), Layout(work)
    prepare(params, layout)
    base(params, layout)
    reference(params, layout)
    return work


def cli_env(work: Path) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(work / ".prefect"), "PREFECT_LOCAL_STORAGE_PATH": str(work / ".prefect" / "s")}
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "600"  # a loaded test machine starts it slowly
    return env


def cli_args(work: Path, command: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", command, "-p", str(work / "params.yaml"), "--root", str(work)]


def cli(work: Path, command: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(work, command), cwd=ROOT, env=cli_env(work), capture_output=True, text=True,
                          timeout=timeout)


def without_timing(csv: Path) -> str:
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    out = io.StringIO()
    df[[c for c in df.columns if not any(t in c for t in TIMING)]].to_csv(out, index=False)
    return out.getvalue()


def cli_tty(work: Path, command: str, timeout: float = 1200, columns: int = 250) -> tuple[int, str]:
    """`memcontrol <command>` with a pseudo-terminal as its stdin, stdout and stderr (a person's
    terminal, `columns` wide); returns (exit code, everything it wrote, control sequences included)."""
    import fcntl
    import pty
    import select
    import signal
    import struct
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, columns, 0, 0))
    env = {k: v for k, v in cli_env(work).items() if k not in ("FORCE_TERMINAL", "TTY_COMPATIBLE", "NO_COLOR")}
    env.update(TERM="xterm-256color", COLUMNS=str(columns))
    proc = subprocess.Popen(cli_args(work, command), cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise TimeoutError(f"{command} still running after {timeout} s")
    finally:
        os.close(master)
    return proc.wait(), b"".join(chunks).decode("utf-8", "replace")
