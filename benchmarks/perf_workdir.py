"""Working folders for the performance benchmarks, built by the pipeline's own once-per-dataset
stages (prepare, base, reference), each stage in its own process so its wall time and peak RSS
are its own.

    python benchmarks/perf_workdir.py WORKDIR [--sd-style] [--out benchmarks/results/stage_memory.json]

WORKDIR/params.yaml is the repository's params.yaml (with --sd-style: `model.path` pointing at an
SD-1.5-layout folder built by tests/sd_style.py in WORKDIR/sd15-style, and the embedded default's
radiographs as the dataset). Records {stage: {wall_s, peak_rss_mb}} to --out (merged by key).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "base", "reference")

_STAGE_CODE = """
import sys, torch
torch.set_num_threads(1)
from pathlib import Path
from memcontrol.config import load_params
from memcontrol.workdir import Layout
wd = Path(sys.argv[1]); stage = sys.argv[2]
if stage != "sd_folder":
    params, layout = load_params(wd / "params.yaml"), Layout(wd)
if stage == "prepare":
    from memcontrol.prepare import prepare; prepare(params, layout)
elif stage == "base":
    from memcontrol.base_model import base; base(params, layout)
elif stage == "reference":
    from memcontrol.reference import reference; reference(params, layout)
elif stage == "sd_folder":
    sys.path.insert(0, sys.argv[3]); from sd_style import build_sd_style; build_sd_style(wd / "sd15-style")
"""


def run_child(args: list[str], env: dict | None = None) -> dict:
    """Run a child process; its own wall time and peak RSS (os.wait4's rusage, Linux: KiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[:3]}... exited with {proc.returncode}")
    return {"wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def stage_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1"}


def build(workdir: Path, *, sd_style: bool = False, copy_data_from: Path | None = None) -> dict:
    """Write params.yaml and run the stages that are not done yet; returns their measurements."""
    workdir.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    out: dict = {}
    if sd_style:
        if not (workdir / "sd15-style").exists():
            out["sd_folder"] = run_child([sys.executable, "-c", _STAGE_CODE, str(workdir), "sd_folder",
                                          str(ROOT / "tests")], stage_env())
        params["model"]["path"] = str((workdir / "sd15-style").resolve())
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if copy_data_from is not None and not (workdir / "data" / "processed").exists():
        import shutil

        for sub in ("data/processed", "data/demo"):
            if (copy_data_from / sub).exists():
                shutil.copytree(copy_data_from / sub, workdir / sub, symlinks=True)
    done = {
        "prepare": (workdir / "data" / "processed" / "manifest.parquet").exists(),
        "base": (workdir / "models" / "base").exists(),
        "reference": (workdir / "data" / "reference" / "threshold.json").exists(),
    }
    for stage in STAGES:
        if not done[stage]:
            out[stage] = run_child([sys.executable, "-c", _STAGE_CODE, str(workdir), stage], stage_env())
            print(f"{stage}: {out[stage]}", flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--sd-style", action="store_true")
    ap.add_argument("--copy-data-from", type=Path, default=None, help="reuse another workdir's prepared data")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--name", default="default")
    a = ap.parse_args(argv)
    res = build(a.workdir, sd_style=a.sd_style, copy_data_from=a.copy_data_from)
    if a.out:
        old = json.loads(a.out.read_text()) if a.out.exists() else {}
        old[a.name] = {**old.get(a.name, {}), **res}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
