"""`memcontrol serve` (issue 13, item 7): every flow becomes a deployment on a real Prefect server
(`prefect server start` on 127.0.0.1, a subprocess), and a run started through the Prefect API, with
a parameter changed as the UI's form would, is executed by the serving process and COMPLETES."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from micro_project import micro_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT the process group (serve pauses its schedules on it), then SIGKILL what is left."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group: uvicorn's and the runner's children too
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prefect server exited:\n{log.read_text()[-4000:]}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.fixture
def server(tmp_path):
    """A real Prefect server (its own SQLite database under a throwaway PREFECT_HOME) on 127.0.0.1."""
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "server.log"
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                             "--no-ui"], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_healthy(url, proc, log)
        yield url
    finally:
        _stop(proc)


def test_serve_registers_every_flow_and_runs_a_deployment_started_through_the_api(server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serve import DEPLOYMENT, FLOWS

    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(micro_params(), sort_keys=False))
    other_root = tmp_path / "elsewhere"  # the parameter the run changes, as a user would in the UI's form
    env = {**os.environ, "PREFECT_API_URL": server, "PREFECT_HOME": str(tmp_path / "serve-home"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "serve.log"
    serving = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--params", "params.yaml",
                                "--cron", "search=0 2 * * *"], cwd=project, env=env,
                               stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: server}):
            with get_client(sync_client=True) as client:
                deadline = time.monotonic() + 300
                while True:  # serve registers the deployments, then starts polling
                    assert serving.poll() is None, f"memcontrol serve exited:\n{log.read_text()[-4000:]}"
                    names = {client.read_flow(d.flow_id).name for d in client.read_deployments()
                             if d.name == DEPLOYMENT}
                    if names >= set(FLOWS):
                        break
                    assert time.monotonic() < deadline, f"deployments seen: {names}\n{log.read_text()[-4000:]}"
                    time.sleep(2)
                search = client.read_deployment_by_name(f"search/{DEPLOYMENT}")
                assert [s.schedule.cron for s in search.schedules] == ["0 2 * * *"]
                assert search.parameters == {"params_path": str(project / "params.yaml")}
                assert {"params_path", "root"} <= set(search.parameter_openapi_schema["properties"])
                assert not client.read_deployment_by_name(f"prepare/{DEPLOYMENT}").schedules
            run = run_deployment(f"prepare/{DEPLOYMENT}", parameters={"root": str(other_root)}, timeout=300)
        assert run.state.is_completed(), f"{run.state}\n{log.read_text()[-6000:]}"
        assert (other_root / "data" / "processed" / "manifest.parquet").is_file()
        assert not (project / "data").exists()  # the run used the parameter, not the default root
    finally:
        _stop(serving)
