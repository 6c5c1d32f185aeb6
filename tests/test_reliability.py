"""Issue 12 items 7 and 9: bad input, measured. Each case below feeds one bad input to the code a
user's command runs and records what the user sees: the one line the CLI prints and its exit code
(flows.cli.user_error / describe decide both, as in `memcontrol <command>`). The params cases and one
CSV case run the real CLI; the rest call the library function the stage calls, because a Prefect
start costs ~20 s each. The table in docs/reliability.md is this file's output: regenerate it with
`MEMCONTROL_WRITE_DOCS=1 pytest tests/test_reliability.py -k table`; a test fails while it is stale.
A bug (any other exception) keeps its traceback: the last tests check that."""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from flows.cli import describe, user_error
from memcontrol import assets
from memcontrol import search as S

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- bad-inputs:begin (tests/test_reliability.py writes this table) -->", "<!-- bad-inputs:end -->"


@dataclass(frozen=True)
class Case:
    name: str      # the bad input, as the table names it
    command: str   # the command that meets it
    expect: str    # regex the user's line must match
    code: int = 1  # the exit code


def dataset(tmp: Path, n: int = 6) -> tuple[Path, Path]:
    """A MIMIC-style folder of real CXRs + CSV (path, text)."""
    root = tmp / "images"
    (root / "p1").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, f in enumerate(assets.pediatric_cxrs()[:n]):
        shutil.copy(f, root / "p1" / f"img{i}.jpg")
        rows.append({"path": f"p1/img{i}.jpg", "text": f"Report {i}. No acute cardiopulmonary process.",
                     "split": ["train", "train", "train", "train", "val", "test"][i % 6], "patient": f"pt{i}"})
    csv = tmp / "data.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv, root


def ingest(tmp: Path, edit=None, **kw):
    from memcontrol.data.manifest import ingest_csv

    csv, root = dataset(tmp)
    d = pd.read_csv(csv, dtype=str, keep_default_na=False)
    if edit is not None:
        d = edit(d, root, tmp)
    if d is not None:
        d.to_csv(csv, index=False)
    return ingest_csv(csv, root, **{"n_mem": 2, **kw})


def _ingest_plain(csv, root):
    from memcontrol.data.manifest import ingest_csv

    return ingest_csv(csv, root)


def _no_manifest(tmp):
    from memcontrol.workdir import Layout, read_manifest

    read_manifest(Layout(tmp))


def _set(row: int, column: str, value):
    def edit(d, root, tmp):
        d.loc[row, column] = value(root, tmp) if callable(value) else value
        return d
    return edit


def _corrupt_png(root, tmp):
    (root / "p1" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return "p1/bad.png"


def _truncated_dicom(root, tmp):
    data = assets.adult_cxr_dicom().read_bytes()
    (root / "p1" / "cut.dcm").write_bytes(data[: len(data) // 2])
    return "p1/cut.dcm"


def _outside(kind):
    def value(root, tmp):
        (tmp / "other").mkdir(exist_ok=True)
        shutil.copy(root / "p1" / "img1.jpg", tmp / "other" / "x.jpg")
        if kind == "symlink":
            (root / "link").symlink_to(tmp / "other", target_is_directory=True)
            return "link/x.jpg"
        return str(tmp / "other" / "x.jpg") if kind == "absolute" else "../other/x.jpg"
    return value


def _mem_csv(path: str, text=None):
    def run(tmp):
        mem = tmp / "mem.csv"
        pd.DataFrame({"path": [path], **({"text": [text]} if text else {})}).to_csv(mem, index=False)
        return ingest(tmp, split_column="split", mem_csv=mem)
    return run


def _overlong_prompt(tmp):
    from memcontrol.encode import warn_truncated
    from memcontrol.models.clip import clip_tokenizer

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("memcontrol.encode").addHandler(handler)
    try:
        warn_truncated(clip_tokenizer(77), ["Normal chest.", "Finding " * 90 + "end."])
    finally:
        logging.getLogger("memcontrol.encode").removeHandler(handler)
    return "warning: " + records[0].getMessage()


def _tiny_unet():
    import yaml

    from memcontrol.config import TinyModel
    from memcontrol.models import tiny

    cfg = TinyModel(**yaml.safe_load((ROOT / "tests" / "micro_params.yaml").read_text())["model"]["tiny"])
    return tiny.build(cfg, seed=0).unet


def _mask_json(tmp, change):
    from memcontrol import tuning

    unet = _tiny_unet()
    good = tuning.mask_for_model(unet, "lora", 1e-3).to_dict()
    f = tmp / "selected.json"
    f.write_text(json.dumps(change(good)))
    tuning.apply(unet, tuning.Mask.load(f))


def _mask_not_json(tmp):
    from memcontrol.tuning import Mask

    (tmp / "selected.json").write_text("{bits: 1")
    Mask.load(tmp / "selected.json")


def _model_folder(tmp, components, extra=()):
    from memcontrol.models.bundle import load_bundle

    d = tmp / "model"
    for c in (*components, *extra):
        (d / c).mkdir(parents=True)
    load_bundle(d)


def _pickle_checkpoint_as_model(tmp):
    from memcontrol.models.bundle import load_bundle

    f = tmp / "model.ckpt"
    torch.save(torch.nn.Linear(2, 2), f)
    load_bundle(f)


def _pickle_as_embedder(tmp):
    from memcontrol.embed import build_embedder

    f = tmp / "embedder.pt"
    torch.save(torch.nn.Linear(2, 2), f)  # a whole pickled model, not a state dict
    build_embedder("mobilenet_v2", path=f)


def _study(tmp, settings=None):
    return S.open_study(tmp / "search" / "study.db", "memcontrol", sampler="nsga2", seed=0, population_size=4,
                        directions=["minimize", "minimize"], settings=settings)


def _resume_other_objectives(tmp):
    from memcontrol.config import Params

    p = Params()
    blocks = ("down_blocks.0.attentions.0", "up_blocks.1.attentions.0")
    st = _study(tmp, S.resume_settings(p, blocks))
    st.tell(st.ask(S.search_space(2, (1e-3,))), [0.5, 0.5])
    other = p.model_copy(update={"search": p.search.model_copy(update={"objectives": ("mem_mean_sim", "fid")})})
    _study(tmp, S.resume_settings(other, blocks))


def _two_searches(tmp):
    with S.study_lock(tmp / "search" / "study.db"):
        with S.study_lock(tmp / "search" / "study.db"):
            pass


def _every_trial_fails(tmp):
    st = _study(tmp)
    blocks = ("b0", "b1", "b2")
    S.optimize(st, S.search_space(3, (1e-3,)), n_trials=4, batch_size=1, seed=0,
               make_mask=lambda p: S.mask_of(p, blocks, method="lora", mode="full", granularity="transformer", options={}),
               evaluate=lambda batch: [S.Outcome(None, reason="FileNotFoundError: data/reference/threshold.json")
                                       for _ in batch])


def _disk_full(tmp):
    """A writer (workdir.write_csv, as trials.csv is written) in a child whose files may not exceed
    4 KiB: a disk that fills mid-write. The child reports the exception the CLI would get."""
    from memcontrol.workdir import write_csv

    target, report = tmp / "search" / "trials.csv", tmp / "report.json"
    write_csv(pd.DataFrame({"x": [1]}), target)
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            try:
                write_csv(pd.DataFrame({"x": range(100_000)}), target)
                out = {"line": "written", "code": 0}
            except Exception as e:
                out = {"line": describe(e), "code": user_error(e)}
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            report.write_text(json.dumps(out))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    out = json.loads(report.read_text())
    assert target.read_text() == "x\n1\n" and not list(target.parent.glob(".*tmp-*")), "old file kept, no temp left"
    return out


CASES: dict[Case, object] = {
    # --- the dataset (memcontrol prepare -> memcontrol.data.manifest.ingest_csv)
    Case("corrupt PNG", "prepare", r"data\.csv row 3: .*bad\.png: not a readable image"):
        lambda t: ingest(t, _set(1, "path", _corrupt_png)),
    Case("truncated DICOM", "prepare", r"data\.csv row 3: .*cut\.dcm: truncated DICOM file \(\d+ of \d+ pixel bytes\)"):
        lambda t: ingest(t, _set(1, "path", _truncated_dicom)),
    Case("empty CSV (header only)", "prepare", r"data\.csv: no data rows"):
        lambda t: ingest(t, lambda d, r, tmp: d.iloc[:0]),
    Case("empty CSV file (0 bytes)", "prepare", r"data\.csv: cannot parse as CSV \(EmptyDataError"):
        lambda t: ingest(t, lambda d, r, tmp: (tmp / "data.csv").write_text("") * 0 or None),
    Case("missing column", "prepare", r"data\.csv: missing column\(s\) \['text'\]; found \['path', 'report'"):
        lambda t: ingest(t, lambda d, r, tmp: d.rename(columns={"text": "report"})),
    Case("duplicate path", "prepare", r"data\.csv row 4: path 'p1/img0\.jpg' duplicates .*data\.csv row 2"):
        lambda t: ingest(t, _set(2, "path", "p1/img0.jpg")),
    Case("empty prompt", "prepare", r"data\.csv row 3: column 'text' \(prompt\) is empty"):
        lambda t: ingest(t, _set(1, "text", "  ")),
    Case("prompt over 77 tokens", "reference", r"warning: 1 of 2 distinct prompts are longer than the text "
                                              r"encoder's 77 tokens and are truncated", 0): _overlong_prompt,
    Case("image file missing", "prepare", r"data\.csv row 3: image .*p1/nope\.jpg not found"):
        lambda t: ingest(t, _set(1, "path", "p1/nope.jpg")),
    Case("image root folder missing", "prepare", r"missing_root: image root folder not found"):
        lambda t: _ingest_plain(dataset(t)[0], t / "missing_root"),
    Case("CSV file missing", "prepare", r"nope\.csv: CSV file not found"):
        lambda t: _ingest_plain(t / "nope.csv", t),
    Case("split value not train/val/test", "prepare", r"data\.csv row 2: column 'split' value 'validate' is not one of"):
        lambda t: ingest(t, _set(0, "split", "validate"), split_column="split"),
    Case("patient in two splits", "prepare", r"data\.csv row 6: group 'pt0' .* is in split 'val' but .*row 2 puts it "
                                            r"in 'train'"):
        lambda t: ingest(t, _set(4, "patient", "pt0"), split_column="split", group_column="patient"),
    Case("mem_csv row not in the CSV", "prepare", r"mem\.csv row 2: path 'p1/other\.jpg' is not in .*data\.csv"):
        _mem_csv("p1/other.jpg"),
    Case("mem_csv row not a train row", "prepare", r"mem\.csv row 2: path 'p1/img4\.jpg' is in split 'val'; the "
                                                  r"memorization subset must be train rows"): _mem_csv("p1/img4.jpg"),
    Case("mem_csv text differs from the CSV", "prepare", r"mem\.csv row 2: column 'text' differs from .*data\.csv row 2"):
        _mem_csv("p1/img0.jpg", text="another report"),
    Case("n_mem larger than the train rows", "prepare", r"data\.csv: n_mem=40 but there are \d train rows"):
        lambda t: ingest(t, n_mem=40),
    Case("absolute path outside image_root", "prepare", r"row 3: path '<tmp>/other/x\.jpg' is absolute; .*"
                                                       r"data\.csv\.allow_outside_root: true"):
        lambda t: ingest(t, _set(1, "path", _outside("absolute"))),
    Case("`../` path out of image_root", "prepare", r"row 3: path '\.\./other/x\.jpg' contains '\.\.'"):
        lambda t: ingest(t, _set(1, "path", _outside("dotdot"))),
    Case("symlink out of image_root", "prepare", r"row 3: path 'link/x\.jpg' is a symlink out of the image root"):
        lambda t: ingest(t, _set(1, "path", _outside("symlink"))),
    # --- masks (masks/selected.json, a mask passed to finetune/export)
    Case("mask: wrong length (bits vs blocks)", "finetune", r"selected\.json: .*mask has \d+ `bits` for \d+ `blocks`"):
        lambda t: _mask_json(t, lambda m: {**m, "bits": m["bits"][:-1]}),
    Case("mask: unknown block name", "finetune", r"mask names blocks this model lacks: \['down_blocks\.9\.attentions\.0'\]"):
        lambda t: _mask_json(t, lambda m: {**m, "blocks": m["blocks"][:-1] + ["down_blocks.9.attentions.0"]}),
    Case("mask JSON for another model (SD-1.5 blocks)", "finetune", r"mask names blocks this model lacks: .*mid_block\.attentions\.0"):
        lambda t: _mask_json(t, lambda m: {**m, "blocks": [f"down_blocks.{i}.attentions.{j}" for i in range(3) for j in range(2)]
                                           + ["mid_block.attentions.0"], "bits": [1] * 7}),
    Case("mask file not JSON", "finetune", r"selected\.json: not valid JSON"): _mask_not_json,
    # --- models (model.path, metrics.embedder_path)
    Case("model folder without a tokenizer", "base", r"model: not a Stable-Diffusion-style diffusers folder; missing "
                                                    r"component folder\(s\) \['tokenizer'\]"):
        lambda t: _model_folder(t, ["vae", "unet", "text_encoder", "scheduler"]),
    Case("SDXL folder", "base", r"model: an SDXL-style folder \(second text encoder\); only SD-1\.x-style models"):
        lambda t: _model_folder(t, ["vae", "unet", "text_encoder", "tokenizer", "scheduler"], ["text_encoder_2", "tokenizer_2"]),
    Case("pickle checkpoint as model.path", "base", r"model\.ckpt: is a file, not a diffusers model folder"):
        _pickle_checkpoint_as_model,
    Case("pickled whole model as metrics.embedder_path", "reference", r"embedder\.pt` is not a plain state dict \(it "
                                                                     r"pickles Python objects.*refused for safety"):
        _pickle_as_embedder,
    # --- the search and the environment
    Case("resume with other objectives", "search", r"study `memcontrol` .* has 1 trials scored with search\.objectives="
                                                  r"\[\"mem_mean_sim\", \"kid_vs_unmasked\"\], but the params now say search\.objectives="
                                                  r"\[\"mem_mean_sim\", \"fid\"\]"): _resume_other_objectives,
    Case("two searches on one study at once", "search", r"study\.db: another search \(host:pid <host>:<pid>\) is running"):
        _two_searches,
    Case("every trial fails (a missing threshold file)", "search", r"3 trials failed in a row \(search\.max_failures=3\); "
                                                                  r"the first, trial 0: FileNotFoundError: data/reference/"
                                                                  r"threshold\.json"): _every_trial_fails,
    Case("stage run before its input exists (no manifest)", "base", r"manifest\.parquet: manifest not found"):
        _no_manifest,
    Case("disk fills mid-write (file size limit)", "search", r"File too large: .*trials\.csv"): _disk_full,
}

# params.yaml: the real CLI (fails before Prefect starts, so each run takes a second or two)
PARAMS_CASES = {
    Case("params: unknown key", "prepare", r"params\.yaml: invalid parameters: search\.n_trails: Extra inputs are not "
                                       r"permitted", 2): "search:\n  n_trails: 3\n",
    Case("params: wrong type", "prepare", r"train\.steps: Input should be a valid integer.*\(got 'many'\)", 2):
        "train:\n  steps: many\n",
    Case("params: NaN", "prepare", r"train\.grad_clip: Input should be a finite number \(got nan\)", 2):
        "train:\n  grad_clip: .nan\n",
    Case("params: unknown sampler", "prepare", r"search\.sampler: Input should be 'nsga2', 'tpe', 'random' or 'gp' \(got 'cmaes'\)", 2):
        "search:\n  sampler: cmaes\n",
    Case("params: not YAML", "prepare", r"params\.yaml: not valid YAML: .* at line 2, column 1", 2): "train: [steps: 3\n",
    Case("params: file missing", "prepare", r"missing\.yaml: file not found", 2): None,
}


def normalise(line: str, tmp: Path) -> str:
    return (line.replace(str(tmp.resolve()), "<tmp>").replace(str(tmp), "<tmp>")
            .replace(f"{socket.gethostname()}:{os.getpid()}", "<host>:<pid>"))


def library_outcome(case: Case, tmp: Path) -> dict:
    try:
        result = CASES[case](tmp)
    except Exception as e:  # what flows/cli.py does with it
        code = user_error(e)
        return {"line": f"{case.command}: {normalise(describe(e), tmp)}", "code": code,
                "bug": None if code is not None else repr(e)}
    if isinstance(result, dict):  # measured in a child process
        return {"line": f"{case.command}: {normalise(result['line'], tmp)}", "code": result["code"], "bug": None}
    if isinstance(result, str):  # accepted with a warning
        return {"line": f"{case.command}: {normalise(result, tmp)}", "code": 0, "bug": None}
    return {"line": f"{case.command}: accepted silently", "code": 0, "bug": None}


def cli_outcome(case: Case, tmp: Path) -> dict:
    params = tmp / ("missing.yaml" if PARAMS_CASES[case] is None else "params.yaml")
    if PARAMS_CASES[case] is not None:
        params.write_text(PARAMS_CASES[case])
    run = subprocess.run([sys.executable, "-m", "flows.cli", "prepare", "-p", str(params), "--root", str(tmp)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [x for x in run.stderr.splitlines() if x.strip()]
    return {"line": normalise(lines[-1] if lines else "", tmp), "code": run.returncode, "bug": None,
            "n_lines": len(lines)}


@pytest.mark.parametrize("case", list(CASES), ids=[c.name for c in CASES])
def test_bad_input_gets_one_line_naming_it_and_its_exit_code(case, tmp_path):
    out = library_outcome(case, tmp_path)
    assert out["bug"] is None, f"{case.name}: raised a non-user error {out['bug']}"
    assert "\n" not in out["line"] and re.search(case.expect, out["line"]), out["line"]
    assert out["code"] == case.code


@pytest.mark.parametrize("case", list(PARAMS_CASES), ids=[c.name for c in PARAMS_CASES])
def test_bad_params_through_the_cli(case, tmp_path):
    out = cli_outcome(case, tmp_path)
    assert out["n_lines"] == 1 and out["code"] == case.code and re.search(case.expect, out["line"]), out


def test_a_bad_csv_through_the_cli_prints_one_line_without_prefects_traceback(tmp_path):
    """The whole path once: `memcontrol prepare` on a CSV row that leaves the image root."""
    csv, root = dataset(tmp_path)
    d = pd.read_csv(csv)
    d.loc[2, "path"] = "../../etc/passwd"
    d.to_csv(csv, index=False)
    (tmp_path / "params.yaml").write_text(f"data:\n  source: csv\n  csv: {{csv: {csv}, image_root: {root}, n_mem: 2}}\n")
    run = subprocess.run([sys.executable, "-m", "flows.cli", "prepare", "-p", str(tmp_path / "params.yaml"), "--root",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [x for x in run.stderr.splitlines() if x.strip()]
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert re.fullmatch(r"prepare: .*data\.csv row 4: path '\.\./\.\./etc/passwd' contains '\.\.'.*", lines[-1])
    assert not any("ERROR" in x for x in lines), lines


def test_a_bug_keeps_its_traceback(monkeypatch):
    """A KeyError from the code is not the user's: the CLI lets it through (traceback, exit 1)."""
    from typer.testing import CliRunner

    import flows.cli as cli
    import flows.pipeline as pipeline

    def broken(**kwargs):
        return {}["missing"]

    monkeypatch.setattr(pipeline, "prepare", broken)
    result = CliRunner().invoke(cli.app, ["prepare", "-p", str(ROOT / "params.yaml")])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)
    assert user_error(KeyError("x")) is None and user_error(ValueError("x")) is None
    monkeypatch.setenv("MEMCONTROL_TRACEBACK", "1")  # and a user error can be traced on demand
    from memcontrol.data.errors import DataError
    assert user_error(DataError("x")) is None


def table(tmp_path_factory) -> str:
    rows = ["| # | bad input | command | what the user sees (one line, stderr) | exit |", "|---|---|---|---|---|"]
    outcomes = [(c, library_outcome(c, tmp_path_factory.mktemp("case"))) for c in CASES]
    outcomes += [(c, cli_outcome(c, tmp_path_factory.mktemp("case"))) for c in PARAMS_CASES]
    for i, (case, out) in enumerate(outcomes, 1):
        line = out["line"].replace("|", "\\|")
        rows.append(f"| {i} | {case.name} | `memcontrol {case.command}` | `` {line} `` | {out['code']} |")
    return "\n".join(rows)


def test_the_table_in_docs_reliability_is_current(tmp_path_factory):
    text = DOC.read_text()
    new = table(tmp_path_factory)
    if os.environ.get("MEMCONTROL_WRITE_DOCS") == "1":
        head, _, rest = text.partition(BEGIN)
        DOC.write_text(head + BEGIN + "\n" + new + "\n" + END + rest.partition(END)[2])
    old = text.partition(BEGIN)[2].partition(END)[0].strip()
    assert len(CASES) + len(PARAMS_CASES) >= 25
    assert old == new or os.environ.get("MEMCONTROL_WRITE_DOCS") == "1", "docs/reliability.md is stale: rerun with MEMCONTROL_WRITE_DOCS=1"
