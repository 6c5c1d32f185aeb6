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


@pytest.fixture(scope="session")
def micro_searched(tmp_path_factory):
    """A micro workdir prepared up to the search (`prepared`, for copies) and a copy searched once,
    uninterrupted, by `memcontrol search` with its output piped (`searched`, its output). Shared by
    the determinism, fault and progress tests."""
    import shutil

    from micro_workdir import cli, prepared as prepare_workdir

    top = tmp_path_factory.mktemp("micro_search")
    prepared = prepare_workdir(top / "prepared")
    searched = top / "searched"
    shutil.copytree(prepared, searched)
    run = cli(searched, "search")
    assert run.returncode == 0, run.stderr[-4000:]
    return prepared, searched, run.stdout + run.stderr


@pytest.fixture(scope="session")
def micro_searched_tty(micro_searched, tmp_path_factory):
    """The same search run again from the prepared copy on a pseudo-terminal: (workdir, output)."""
    import shutil

    from micro_workdir import cli_tty

    work = tmp_path_factory.mktemp("micro_search_tty") / "searched"
    shutil.copytree(micro_searched[0], work)
    code, out = cli_tty(work, "search")
    assert code == 0, out[-4000:]
    return work, out
