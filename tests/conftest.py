import pytest

from memcontrol import offline

offline.apply()  # offline and quiet for every test, before any library import


@pytest.fixture(scope="session")
def micro_project(tmp_path_factory):
    """A fresh clone on the micro configuration after the README's DVC block (run as written, no
    venv on PATH: the demo chain, an experiment with the random sampler, metrics, exp show, plots),
    then `memcontrol export models/export` and `memcontrol release`. Returns (folder, README block's
    output). Shared by the DVC, export-card, MLflow UI and Optuna tests."""
    from micro_project import clone, readme_block, shell

    project = clone(tmp_path_factory.mktemp("clone"))
    out = shell(readme_block("### DVC", "dvc repro compare"), project)
    shell("source scripts/env.sh\nmemcontrol export models/export\nmemcontrol release", project)
    return project, out


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A real PostgreSQL server (Debian's package, installed by scripts/postgres.sh if missing) on
    127.0.0.1 and a free port, with a throwaway data directory; stopped after the session.
    Returns the SQLAlchemy URL of its database `memcontrol`. Tests use their own study names."""
    import socket
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "postgres.sh"
    datadir = tmp_path_factory.mktemp("postgres") / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = subprocess.run(["bash", str(script), "start", str(datadir), str(port)], check=True, capture_output=True,
                         text=True, timeout=600).stdout.strip().splitlines()[-1]
    try:
        yield url
    finally:
        subprocess.run(["bash", str(script), "stop", str(datadir)], check=False, timeout=120)
