"""Why a trial ran 1.5x slower on a Dask worker than in a process of its own (issue 13): Dask's
nanny starts every worker with MALLOC_TRIM_THRESHOLD_=65536 (`distributed.nanny.pre-spawn-environ`).
Set at all, that variable stops glibc from raising its mmap threshold as large blocks are freed, so
each training step maps and unmaps its large tensors anew. flows/parallel.worker_environ leaves it
out.

The same trial (the cheap search's: params.yaml with train.steps 60, the middle LR, every other
block; torch on one thread), timed four ways, one after the other:
  process             a plain process;
  process, 64 KiB     a plain process with MALLOC_TRIM_THRESHOLD_=65536;
  Dask default        a one-worker LocalCluster with Dask's default worker environment;
  Dask, memcontrol    the same with flows.parallel.worker_environ() (what `search.workers` starts).

    python benchmarks/worker_malloc.py [--workdir DIR] [--out benchmarks/results/worker_malloc.json]
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",  # PYTHONPATH: for the Dask worker
                  PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")])))


def trial(root: str, out: str) -> dict:
    """One trial in this process: wall seconds and CPU seconds."""
    import torch

    from memcontrol import offline
    offline.apply()
    torch.set_num_threads(1)
    from memcontrol.config import load_params
    from memcontrol.workdir import Layout
    from tasks.stages import run_arm
    from trial_profile import default_mask

    params = load_params(Path(root) / "params.yaml")
    mask = default_mask(params, Layout(Path(root)))
    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), time.process_time()
    run_arm.fn(params, root, mask.to_json(), out, arm="trial", seed=params.seed, steps=params.train.steps)
    return {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
            "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_")}


def start_trial(root: Path, out: Path, extra_env: dict | None = None) -> subprocess.Popen:
    """`trial` in a plain process of its own (started, not waited for: see `trial_result`)."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"} | (extra_env or {})
    code = f"import sys, json; sys.path[:0] = {[str(ROOT), str(ROOT / 'benchmarks')]!r}; import worker_malloc as w; " \
           f"print(json.dumps(w.trial({str(root)!r}, {str(out)!r})))"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def trial_result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"a trial process failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def in_process(root: Path, out: Path, extra_env: dict) -> dict:
    return trial_result(start_trial(root, out, extra_env))


def on_dask(root: Path, out: Path, environ: dict | None) -> dict:
    import dask
    from distributed import Client, LocalCluster

    settings = {} if environ is None else {"distributed.nanny.pre-spawn-environ": environ}
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)  # an earlier cluster's nanny wrote it into this process
    with dask.config.set(settings), LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                                                 dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        return client.submit(trial, str(root), str(out), pure=False).result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="a prepared workdir is made here (default: temp)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "worker_malloc.json")
    args = ap.parse_args()
    from scale_out import base_params, command_line, prepare_workdir

    from flows.parallel import worker_environ

    work = args.workdir or Path(tempfile.mkdtemp(prefix="worker_malloc-"))
    root = work / "prepared"
    if not (root / "data" / "reference").exists():
        prepare_workdir(root, base_params(False, 13, 60, 4))
    rows = {
        "process": in_process(root, work / "a", {}),
        "process, 64 KiB": in_process(root, work / "b", {"MALLOC_TRIM_THRESHOLD_": "65536"}),
        "Dask default": on_dask(root, work / "c", None),
        "Dask, memcontrol": on_dask(root, work / "d", worker_environ()),
    }
    result = {"command": command_line("worker_malloc.py", args.workdir),
              "load_avg_at_end": [round(x, 2) for x in os.getloadavg()], "trials": rows,
              "dask_default_over_process": round(rows["Dask default"]["wall_s"] / rows["process"]["wall_s"], 2),
              "memcontrol_over_process": round(rows["Dask, memcontrol"]["wall_s"] / rows["process"]["wall_s"], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, row in rows.items():
        print(f"{name:18s} {row['wall_s']:7.2f} s wall  {row['cpu_s']:7.2f} s CPU  MALLOC_TRIM_THRESHOLD_={row['MALLOC_TRIM_THRESHOLD_']}")
    print(f"wrote {args.out}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
