from pathlib import Path

import pytest

from memcontrol.config import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.search.n_trials >= 12
    assert p.data.demo.n_train >= 400 and p.data.demo.n_test >= 80
    assert p.data.demo.n_val + p.data.demo.n_test >= 2 * 40  # the floor needs >= 40 held-out images per check


def test_unknown_key_is_an_error_naming_it(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("search:\n  n_trails: 3\n")
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert "search.n_trails" in str(e.value) and str(f) in str(e.value)


def test_bad_objective_and_missing_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("search:\n  objectives: [mem_rate, nope]\n")
    with pytest.raises(ConfigError, match="nope"):
        load_params(f)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_csv_source_needs_its_section(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("data:\n  source: csv\n")
    with pytest.raises(ConfigError, match="data.csv"):
        load_params(f)
