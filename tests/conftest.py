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
