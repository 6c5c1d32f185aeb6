"""Fault injection, measured (issue 12 item 8): `memcontrol demo` on the micro configuration
(tests/micro_params.yaml) is killed with SIGKILL at random moments spread over its stages, then
rerun to the end; the result must be that of an uninterrupted run with the same seed.

    .venv/bin/python benchmarks/faults.py [--kills 20] [--seed 0] [--work DIR] \
        [--out benchmarks/results/faults.json] [--doc docs/reliability.md]

First one uninterrupted run gives the reference and each stage's time window. Kill moments are
drawn stratified: kill i falls in stage i mod 6, uniformly inside that stage (`kill_in`: timed from
the moment the stage began: prepare's first write, or the stage before's output); the table counts a kill under the
stage whose output was missing at the kill. Each kill runs in a fresh copy of the workdir, so kills
are independent. After a kill, the finished trial and
arm records (every `metrics.json`) are noted by inode, the demo is rerun to the end, and the benchmark checks:

- final mask (`masks/selected.json`) byte-identical to the reference;
- `search/trials.csv` byte-identical once the clock columns (`*_seconds`) and Optuna's trial
  `number` are dropped (a trial a kill interrupted keeps its number, failed, so later ones shift);
- `reports/metrics.json` equal once every `*seconds*` key is dropped;
- the MLflow store holds as many current runs as the reference's (none duplicated, none lost);
- no half-written file under a real name (every output is checked to parse), at the kill and after
  the rerun; temp files of killed writers (memcontrol.atomic.leftovers) are counted at the kill and
  must be gone after the rerun (every `memcontrol` command removes those of dead writers);
- recomputed work: finished records (metrics.json present at the kill) rewritten by the rerun.

Every kill goes to benchmarks/results/faults.json; the table in docs/reliability.md (between
markers) is written from that JSON (`--table-only` rewrites it from the JSON alone).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memcontrol import atomic  # noqa: E402

STAGES = ("prepare", "base", "reference", "search", "finetune", "compare")
BEGIN, END = "<!-- faults:begin (benchmarks/faults.py writes this table) -->", "<!-- faults:end -->"


def fresh(work: Path) -> Path:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "micro_params.yaml", work / "params.yaml")
    return work


def start(work: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(work / ".prefect"), "PREFECT_LOCAL_STORAGE_PATH": str(work / ".prefect" / "s")}
    env.pop("PREFECT_API_URL", None)
    # a loaded machine can take longer than scripts/env.sh's 90 s to start Prefect's ephemeral server
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "900"
    log = open(work / f"demo-{time.time_ns()}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "demo", "-p", str(work / "params.yaml"), "--root",
                             str(work)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: the kill reaches its workers too


def run_to_end(work: Path, timeout: float | None = None) -> float | None:
    """Seconds the demo took to finish, or None if it was still running after `timeout` (a hang).
    A failed run raises RuntimeError with its log's tail."""
    t0 = time.perf_counter()
    proc = start(work)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None
    if proc.returncode != 0:
        log = max(work.glob("demo-*.log"), key=lambda f: f.stat().st_mtime).read_text()
        raise RuntimeError(f"demo in {work} failed (exit {proc.returncode}): {log[-1500:]}")
    return time.perf_counter() - t0


def differences(got: str, want: str, limit: int = 6) -> list:
    """The first cells that differ between two CSV texts (for the JSON row of a mismatch)."""
    import io

    a, b = pd.read_csv(io.StringIO(got), dtype=str), pd.read_csv(io.StringIO(want), dtype=str)
    if a.shape != b.shape:
        return [f"shape {a.shape} != {b.shape}"]
    return [[int(i), c, a.at[i, c], b.at[i, c]] for i in a.index for c in a.columns if a.at[i, c] != b.at[i, c]][:limit]


def no_clock(obj):
    if isinstance(obj, dict):
        return {k: no_clock(v) for k, v in obj.items() if "seconds" not in k}
    return obj


def trials_without_clock(work: Path) -> str:
    """trials.csv without the clock columns and Optuna's trial `number` (it counts every ask, so a
    trial a kill interrupted, failed on the rerun, shifts the numbers of the trials after it)."""
    df = pd.read_csv(work / "search" / "trials.csv", dtype=str, keep_default_na=False)
    return df[[c for c in df.columns if "seconds" not in c and c != "number"]].to_csv(index=False)


def mlflow_runs(work: Path) -> int:
    """Runs that are current: not marked superseded by a rerun (tasks/tracking.py)."""
    with sqlite3.connect(work / "mlflow.db") as db:
        total = db.execute("select count(*) from runs where lifecycle_stage = 'active'").fetchone()[0]
        stale = db.execute("select count(*) from tags where key = 'memcontrol_current' and value = 'false'").fetchone()[0]
    return total - stale


def records(work: Path) -> dict[str, int]:
    """Every finished arm's record (trials, Stage 2, full FT) -> its inode."""
    return {str(f.relative_to(work)): f.stat().st_ino for f in work.rglob("metrics.json")
            if "reports" not in f.parts and "mlruns" not in f.parts}  # mlruns: MLflow's copies, logged again


def half_written(work: Path) -> list[str]:
    """Outputs under their real names that do not parse (JSON, CSV, parquet)."""
    bad = []
    for f in work.rglob("*"):
        if not f.is_file() or atomic.TEMP_MARK in f.name or ".prefect" in f.parts or ".dvc" in f.parts:
            continue
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".csv":
                pd.read_csv(f)
            elif f.suffix == ".parquet":
                pd.read_parquet(f)
        except Exception:
            bad.append(str(f.relative_to(work)))
    return bad


def outcome(work: Path) -> dict:
    return {"mask": (work / "masks" / "selected.json").read_bytes(), "trials": trials_without_clock(work),
            "metrics": no_clock(json.loads((work / "reports" / "metrics.json").read_text())),
            "runs": mlflow_runs(work)}


def outputs(work: Path) -> dict[str, Path]:
    """Each stage's last output: present once the stage has finished."""
    return {"prepare": work / "data" / "processed" / "manifest.parquet", "base": work / "models" / "base",
            "reference": work / "data" / "reference" / "threshold.json", "search": work / "masks" / "selected.json",
            "finetune": work / "models" / "final" / "seed0" / "metrics.json",
            "compare": work / "reports" / "metrics.json"}


def stage_at_kill(work: Path) -> str:
    """The stage the kill hit, read from the outputs present: the first stage whose output is missing."""
    done = outputs(work)
    return next((stage for stage in STAGES if not done[stage].exists()), "after compare")


def kill_in(proc: subprocess.Popen, work: Path, stage: str, win: dict, rng: random.Random) -> tuple[bool, float]:
    """SIGKILL the demo at a moment drawn uniformly inside `stage`: once the stage has begun (for
    prepare, once it has made the workdir's data/ folder, its first write, after Prefect's start; for
    a later stage, once the stage before has written its output), within the reference run's
    duration of the stage (the machine's load moves absolute moments). Returns (killed, seconds since
    the start); not killed if the demo ended first."""
    t0 = time.perf_counter()
    begun = work / "data" if stage == "prepare" else outputs(work)[STAGES[STAGES.index(stage) - 1]]
    while not begun.exists() and proc.poll() is None:
        time.sleep(0.05)
    at = time.perf_counter() - t0 + rng.uniform(0, win[stage][1] - win[stage][0])
    try:
        proc.wait(timeout=max(at - (time.perf_counter() - t0), 0.01))
        return False, at
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True, at


def windows(work: Path, wall: float) -> dict[str, tuple[float, float]]:
    """Each stage's (start, end) in seconds since the demo started; the Prefect start is before prepare."""
    secs = json.loads((work / "reports" / "demo_timings.json").read_text())["seconds"]
    end, out = wall, {}
    for stage in reversed(STAGES):
        out[stage] = (end - secs[stage], end)
        end -= secs[stage]
    return dict(reversed(list(out.items())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "memcontrol-faults")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "faults.json")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "reliability.md")
    ap.add_argument("--rerun-timeout", type=float, default=600.0, help="a rerun still going after this is a hang")
    ap.add_argument("--recheck", type=int, metavar="KILL", help="rerun the kept workdir of a kill recorded as hung "
                    "to the end without a timeout, and add the comparison to its row as `recheck`")
    ap.add_argument("--seconds-before", type=float, default=0.0,
                    help="with --resume of a JSON without seconds_so_far: the stopped run's wall seconds")
    ap.add_argument("--resume", action="store_true", help="continue a stopped run from its partial JSON --out "
                    "(its reference workdir under --work is reused)")
    ap.add_argument("--table-only", action="store_true", help="rewrite the table in --doc from the JSON --out, run nothing")
    args = ap.parse_args()
    if args.table_only:
        write_table(args.doc, json.loads(args.out.read_text()))
        return
    started, ref_dir = time.perf_counter(), args.work / "reference"
    if args.recheck is not None:
        recheck(args, ref_dir)
        return
    if args.resume:
        earlier = json.loads(args.out.read_text())
        wall, win, rows = earlier["reference_wall_s"], earlier["windows"], earlier["kills"]
        spent = earlier.get("seconds_so_far", args.seconds_before)
    else:
        wall, spent, rows = run_to_end(fresh(ref_dir)), 0.0, []
        win = windows(ref_dir, wall)
    ref = outcome(ref_dir)
    print(f"reference: {wall:.0f} s; stage windows {({k: tuple(round(x) for x in v) for k, v in win.items()})}", flush=True)

    def partial() -> dict:
        return {"reference_wall_s": round(wall, 1), "windows": win, "kills": rows, "seed": args.seed,
                "kills_asked": args.kills, "partial": True,
                "seconds_so_far": round(spent + time.perf_counter() - started, 1)}

    landed, i = sum(r["killed"] for r in rows), len(rows) - 1
    while landed < args.kills and i < 2 * args.kills:  # a run that finishes before its moment is drawn again
        i += 1
        rng = random.Random(f"{args.seed}-{i}")  # each kill its own draw: a resumed run draws the same
        stage = STAGES[landed % len(STAGES)]
        work = fresh(args.work / f"kill{i:02d}")
        killed, at = kill_in(start(work), work, stage, win, rng)
        landed += killed
        if not killed:
            rows.append({"kill": i, "stage": stage, "at_s": round(at, 1), "killed": False})
            print(json.dumps(rows[-1]), flush=True)
            save(args, partial())
            continue
        aimed, stage = stage, stage_at_kill(work)
        before = records(work)
        broken_at_kill = half_written(work)
        leftovers = len(atomic.leftovers(work))
        t0 = time.perf_counter()
        try:
            finished = run_to_end(work, timeout=args.rerun_timeout)
        except RuntimeError as e:
            if "Timed out while attempting to connect to ephemeral Prefect API" not in str(e):
                raise
            print(f"kill {i}: the rerun's Prefect server did not start in time (load); rerunning", flush=True)
            finished = run_to_end(work, timeout=args.rerun_timeout)
        if finished is None:
            row = {"kill": i, "stage": stage, "aimed_at": aimed, "at_s": round(at, 1), "killed": killed,
                   "recovered": False,
                   "mismatches": ["hung"], "finished_records_at_kill": len(before), "recomputed": 0,
                   "recomputed_records": [], "half_written_at_kill": broken_at_kill,
                   "temp_leftovers_at_kill": leftovers, "rerun_s": None, "hung": True,
                   "half_written_after_rerun": [], "temp_leftovers_after_rerun": None}
            rows.append(row)
            print(json.dumps(row), flush=True)
            save(args, partial())
            continue  # the workdir stays for a look
        got = outcome(work)
        after = records(work)
        recomputed = sorted(k for k, ino in before.items() if after.get(k) != ino)
        broken_after, left_after = half_written(work), [str(p.relative_to(work)) for p in atomic.leftovers(work)]
        mismatch = [k for k in ("mask", "trials", "metrics", "runs") if got[k] != ref[k]]
        mismatch += ["half-written file"] * bool(broken_after) + ["temp file left"] * bool(left_after)
        diff = differences(got["trials"], ref["trials"]) if got["trials"] != ref["trials"] else []
        row = {"kill": i, "stage": stage, "aimed_at": aimed, "at_s": round(at, 1), "killed": killed,
               "recovered": not mismatch,
               "mismatches": mismatch, "finished_records_at_kill": len(before), "recomputed": len(recomputed),
               "recomputed_records": recomputed, "half_written_at_kill": broken_at_kill,
               "temp_leftovers_at_kill": leftovers, "rerun_s": round(time.perf_counter() - t0, 1),
               "runs": got["runs"], "reference_runs": ref["runs"], "half_written_after_rerun": broken_after,
               "temp_leftovers_after_rerun": left_after, "trials_diff": diff}
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(args, partial())  # an interrupted benchmark keeps what it measured (--resume goes on from it)
        shutil.rmtree(work, ignore_errors=True)

    total = spent + time.perf_counter() - started
    result = {"reference_wall_s": round(wall, 1), "benchmark_wall_s": round(total, 1), "windows": win, "kills": rows,
              "seed": args.seed, "kills_asked": args.kills}
    save(args, result)
    write_table(args.doc, result)


def recheck(args, ref_dir: Path) -> None:
    """Was a 'hung' rerun a hang or only slow (a loaded machine)? Its workdir was kept: rerun it to
    the end with no timeout and compare as for any kill."""
    result = json.loads(args.out.read_text())
    row = next(r for r in result["kills"] if r["kill"] == args.recheck)
    work, ref = args.work / f"kill{args.recheck:02d}", outcome(ref_dir)
    logs = sorted(work.glob("demo-*.log"), key=lambda f: f.stat().st_mtime)
    t0 = time.perf_counter()
    run_to_end(work)
    got = outcome(work)
    mismatch = [k for k in ("mask", "trials", "metrics", "runs") if got[k] != ref[k]]
    row["recheck"] = {"rerun_s": round(time.perf_counter() - t0, 1), "recovered": not mismatch, "mismatches": mismatch,
                      "hung_rerun_log_bytes": logs[-1].stat().st_size if logs else None,
                      "half_written_after_rerun": half_written(work),
                      "temp_leftovers_after_rerun": [str(p.relative_to(work)) for p in atomic.leftovers(work)]}
    print(json.dumps(row), flush=True)
    save(args, result)
    write_table(args.doc, result)


def save(args, result: dict) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(args.out, json.dumps(result, indent=2) + "\n")


def write_table(doc: Path, result: dict) -> None:
    rows, wall = result["kills"], result["reference_wall_s"]
    total = (f", whole benchmark {result['benchmark_wall_s'] / 60:.0f} min" if "benchmark_wall_s" in result else
             f", stopped after {result['seconds_so_far'] / 60:.0f} min" if "seconds_so_far" in result else "")
    landed = sum(r["killed"] for r in rows)
    partial = f" of {result['kills_asked']} asked (stopped early)" if result.get("partial") else ""
    lines = [f"{landed} kills{partial} (seed {result['seed']}), micro configuration, reference run "
             f"{wall:.0f} s{total} (`benchmarks/results/faults.json` has each kill):", "",
             "| stage | kills | recovered (same mask, trials, metrics, MLflow runs) | finished records at the kill | "
             "recomputed | half-written files at the kill / after the rerun | temp files at the kill / after the rerun "
             "| mismatches |",
             "|---|---|---|---|---|---|---|---|"]
    for stage in (*STAGES, "after compare"):
        rs = [r for r in rows if r["stage"] == stage and r["killed"]]
        if not rs:
            continue
        mism = sorted({m for r in rs for m in r["mismatches"]})
        rechecked = [r for r in rs if "recheck" in r]
        if rechecked:  # a 'hung' rerun rerun to the end without a timeout
            mism = [m + (" (rerun without a timeout: " + ("recovered" if all(r["recheck"]["recovered"] for r in rechecked)
                                                           else "not recovered") + ")" if m == "hung" else "")
                    for m in mism]
        after = sum(len(r.get("half_written_after_rerun") or []) for r in rs)
        left = sum(len(r.get("temp_leftovers_after_rerun") or []) for r in rs)
        lines.append(f"| {stage} | {len(rs)} | {sum(r['recovered'] for r in rs)} | "
                     f"{sum(r['finished_records_at_kill'] for r in rs)} | {sum(r['recomputed'] for r in rs)} | "
                     f"{sum(len(r['half_written_at_kill']) for r in rs)} / {after} | "
                     f"{sum(r['temp_leftovers_at_kill'] for r in rs)} / {left} | {', '.join(mism) or '-'} |")
    if landed < len(rows):
        lines += ["", f"{len(rows) - landed} more run(s) finished before their kill moment and were drawn again."]
    text = doc.read_text()
    if BEGIN in text:
        head, _, rest = text.partition(BEGIN)
        text = head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + rest.partition(END)[2]
    else:
        text = text.rstrip("\n") + "\n\n## Fault injection, measured\n\n" + BEGIN + "\n" + "\n".join(lines) + "\n" + END + "\n"
    atomic.write_text(doc, text)


if __name__ == "__main__":
    main()
