"""Scale-out on one machine (issue 13): the same cheap search with 1 worker (in-process, SQLite: the
default path) and with 2 workers (prefect-dask LocalCluster of 2 single-threaded processes, the study
in PostgreSQL), torch on 1 thread per worker; trials per hour and the speed-up. Then what the
coordination costs per trial, without training:

- storage: the ask/tell loop (memcontrol.search.optimize, heartbeats included) with a stand-in
  evaluation, on the SQLite file and on PostgreSQL: seconds per trial;
- Dask: a no-op Prefect task run through the search's DaskTaskRunner (flows/parallel.py: the
  `trial` resource, a LocalCluster of 2 processes), one at a time, against the same task called in
  the flow's own process; plus the cluster's start-up (paid once per search); and batches of 4
  one-second tasks on the 2 workers, with and without Prefect tags (a tagged task run first takes a
  concurrency lease from the Prefect API: the trial tasks carry no tags); and the CPU an idle
  2-worker cluster takes with Dask's defaults and with flows/parallel.QUIET.

And why a worker's trial is slower than a trial alone: the same trial in plain processes (no Dask,
Prefect or database), alone and two at once; and for each search, the CPU seconds every process
on the machine spent while it ran, by role (trial workers, the search process with Dask's
scheduler and nannies, the Prefect server, PostgreSQL, anything else).

Usage: python benchmarks/scale_out.py [--trials 13] [--batch-size 4] [--steps 60] [--repeats 2] [--workdir DIR]
       [--out benchmarks/results/scale_out.json]
       python benchmarks/scale_out.py --tiny --out <somewhere>/scale_out_tiny.json   # a check of the script only
The search runs use params.yaml with search.n_trials and train.steps set (search.batch_size: the default 4;
with the relative objective the 3 anchors run first, as a batch of their own);
--tiny uses tests/micro_params.yaml instead (seconds per trial: overhead dominates, no speed-up to see).
PostgreSQL (scripts/postgres.sh) and one Prefect server for all runs are started on free ports of
127.0.0.1 and stopped at the end. Run it on an
otherwise idle machine: the 2-worker run needs both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # torch on one thread: read when torch is imported
os.environ.setdefault("MKL_NUM_THREADS", "1")

import optuna  # noqa: E402
import yaml  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from memcontrol import offline  # noqa: E402

offline.apply()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """One Prefect server on 127.0.0.1 for every run (no ephemeral server started per search, so its
    start-up is in no run's time); its API URL, exported for the searches and this process."""
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_LOCAL_STORAGE_PATH": str(home / "s")}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the Prefect server did not start")
            time.sleep(1)
        os.environ["PREFECT_API_URL"] = api
        yield api
    finally:
        server.terminate()
        server.wait(timeout=60)


def command_line(script: str, workdir: Path | None) -> str:
    """How this run was started, for the results JSON: this machine's --workdir shown as <workdir>."""
    args = " ".join(sys.argv[1:])
    return f"python benchmarks/{script} " + (args.replace(str(workdir), "<workdir>") if workdir else args)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def base_params(tiny: bool, trials: int, steps: int, batch_size: int) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if tiny:
        params = _merge(params, yaml.safe_load((ROOT / "tests" / "micro_params.yaml").read_text()))
        params["search"].update(n_trials=trials)
    else:
        params["search"].update(n_trials=trials)
        params["train"].update(steps=steps)
    params["search"].update(batch_size=batch_size, workers=1, storage=None)
    return params


def prepare_workdir(work: Path, params: dict) -> None:
    """prepare, base and reference once: every search run starts from a copy."""
    from memcontrol.base_model import base
    from memcontrol.config import load_params
    from memcontrol.prepare import prepare
    from memcontrol.reference import reference
    from memcontrol.workdir import Layout

    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    p, layout = load_params(work / "params.yaml"), Layout(work)
    prepare(p, layout)
    base(p, layout)
    reference(p, layout)


def run_search(prepared: Path, work: Path, **search) -> dict:
    """`memcontrol search` (the CLI, a fresh process) on a copy of the prepared workdir."""
    shutil.copytree(prepared, work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["search"].update(search)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # PREFECT_API_URL: prefect_server()
    t0 = time.perf_counter()
    log = open(work / "search.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "search", "-p", str(work / "params.yaml"), "--root",
                             str(work)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    split = CpuSplit(proc.pid)
    while proc.poll() is None:
        split.sample()
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        log.seek(0)
        raise SystemExit(f"search {search} failed:\n{log.read()[-4000:]}")
    storage = search.get("storage") or f"sqlite:///{work / 'search' / 'study.db'}"
    study = optuna.load_study(study_name=params["search"]["study_name"], storage=storage)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    loop = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {"workers": params["search"]["workers"], "storage": "postgresql" if search.get("storage") else "sqlite",
            "n_trials": len(done), "search_wall_s": round(wall, 1), "trial_loop_s": round(loop, 1),
            "trials_per_hour": round(len(done) / loop * 3600, 1),
            "seconds_per_trial_in_worker": round(sum(json.loads(t.user_attrs["record"])["metrics"]["wall_seconds"] for t in done)
                                                 / len(done), 2),
            "cpu_split": split.result(wall)}


ROLES = ("trial workers", "search process (Dask scheduler and nannies included)", "Prefect server", "PostgreSQL",
         "anything else")


def _role(proc, search_pid: int) -> str:
    try:
        cmd = " ".join(proc.cmdline())
        parents = [p.pid for p in proc.parents()]
    except Exception:
        return ROLES[4]
    if proc.pid == search_pid:
        return ROLES[1]
    if search_pid in parents:
        return ROLES[0]
    if "prefect" in cmd and ("server" in cmd or "uvicorn" in cmd):
        return ROLES[2]
    if "postgres" in cmd:
        return ROLES[3]
    return ROLES[4]


class CpuSplit:
    """CPU seconds each process spent while a search ran, summed by role: where the machine's two
    cores went (what slows each worker's trial down beside the trials themselves)."""

    def __init__(self, search_pid: int):
        import psutil

        self.psutil, self.search_pid, self.start, self.last = psutil, search_pid, {}, {}
        for proc in psutil.process_iter():
            self._see(proc, first=True)

    def _see(self, proc, first: bool = False) -> None:
        try:
            times = proc.cpu_times()
        except Exception:
            return
        key = (proc.pid, proc.create_time())
        total = times.user + times.system
        if first:
            self.start[key] = total
        if key not in self.last:
            self.last[key] = [_role(proc, self.search_pid), total]
        self.last[key][1] = total

    def sample(self) -> None:
        for proc in self.psutil.process_iter():
            self._see(proc)

    def result(self, wall: float) -> dict:
        out = {role: 0.0 for role in ROLES}
        for key, (role, total) in self.last.items():
            out[role] += total - self.start.get(key, 0.0)
        return {"wall_s": round(wall, 1), "cpu_s": {k: round(v, 1) for k, v in out.items()},
                "share_of_two_cores": {k: round(v / (2 * wall), 3) for k, v in out.items()}}


def side_by_side(prepared: Path, work: Path) -> dict:
    """The same trial (the default's middle LR, every other block) in plain processes, no Dask,
    Prefect or database: alone, then two at once. How much two trials slow each other down on
    this machine by themselves."""
    from worker_malloc import start_trial, trial_result

    def run(n: int, tag: str) -> list[float]:
        procs = [start_trial(prepared, work / f"{tag}{i}") for i in range(n)]
        return [round(trial_result(p)["wall_s"], 2) for p in procs]

    alone = run(1, "alone")
    pair = run(2, "pair")
    return {"alone_s": alone[0], "side_by_side_s": pair, "slowdown": round(sum(pair) / len(pair) / alone[0], 2),
            "speedup_bound": round(2 * alone[0] / max(pair), 2)}


def storage_overhead(url: str, n: int = 30) -> float:
    """Seconds per trial of the ask/tell loop itself (heartbeats included), stand-in evaluation."""
    from memcontrol import search as S
    from memcontrol import study_storage

    blocks = tuple(f"block{i}" for i in range(18))
    study = S.open_study(url, f"overhead-{time.time_ns()}", sampler="nsga2", seed=0, population_size=8,
                         directions=["minimize", "minimize"], heartbeat_interval=10, grace_period=60)
    make = lambda p: S.mask_of(p, blocks, method="lora", mode="full", granularity="transformer", options={})

    def evaluate(batch):
        out = []
        for trial, mask in batch:
            with study_storage.beating(study, trial._trial_id):
                out.append(S.Outcome([sum(mask.bits) + mask.lr, len(mask.bits) - sum(mask.bits)], {"bits": mask.bits}))
        return out

    t0 = time.perf_counter()
    S.optimize(study, S.search_space(len(blocks), (1e-4, 3e-4, 1e-3)), n_trials=n, batch_size=2, make_mask=make,
               evaluate=evaluate, seed=0)
    return (time.perf_counter() - t0) / S.n_finished(study)


TAGS = ["gpu", "trial"]  # the trial tasks' Prefect tags before they were dropped (tasks/stages.py)


def batch_overrun(runner, fn, rounds: int = 6, seconds: float = 1.0) -> dict:
    """Batches of 4 tasks of `seconds` each on the 2 workers (a search's batch): how much longer than
    2 x `seconds` a batch takes from its submission to its last result (each worker starts its two
    tasks one after the other), median and max over `rounds`."""
    import statistics

    over = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        futures = [runner.submit(fn, parameters={"seconds": seconds}) for _ in range(4)]
        for f in futures:
            f.result()
        over.append(time.perf_counter() - t0 - 2 * seconds)
    return {"median": round(statistics.median(over), 3), "max": round(max(over), 3)}


def dask_overhead(n: int = 20) -> dict:
    """Per no-op trial: through the search's DaskTaskRunner vs called in the flow's process."""
    import dask
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from flows import parallel
    from memcontrol.config import Search

    @task(cache_policy=NO_CACHE)
    def noop(i: int) -> int:
        return i

    @task(cache_policy=NO_CACHE)
    def started(seconds: float) -> None:
        time.sleep(seconds)

    @flow(name="scale-out-overhead")
    def measure() -> dict:
        noop(-1)
        t0 = time.perf_counter()
        for i in range(n):
            noop(i)
        local = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        with parallel.trial_runner(Search(workers=2, batch_size=2)) as runner:
            start = time.perf_counter() - t0
            with dask.annotate(resources=parallel.RESOURCE):
                runner.submit(noop, parameters={"i": -1}).result()
                t1 = time.perf_counter()
                for i in range(n):
                    runner.submit(noop, parameters={"i": i}).result()
                remote = (time.perf_counter() - t1) / n
                overrun = {name: batch_overrun(runner, fn) for name, fn in (("untagged", started),
                                                                        ("tagged", started.with_options(tags=TAGS)))}
        return {"prefect_task_in_process_s": round(local, 4), "prefect_task_on_dask_s": round(remote, 4),
                "dask_per_trial_s": round(remote - local, 4), "cluster_start_s": round(start, 1),
                "batch_of_4_overrun_s": overrun, "tags_tried": TAGS}

    return measure()


def idle_cluster_cpu(seconds: float = 20.0) -> dict:
    """CPU that a 2-worker cluster takes while its workers hold no task, in % of one core: the
    search's process (scheduler and client) and the workers with their nannies. With Dask's
    defaults (a LocalCluster of the same shape) and as the search starts it (flows.parallel.
    trial_runner: parallel.QUIET); on a machine the trials fill, this comes out of the trials."""
    import dask
    import psutil
    from distributed import Client, LocalCluster

    from flows import parallel
    from memcontrol.config import Search

    me = psutil.Process()

    def cpu(proc) -> float:
        times = proc.cpu_times()
        return times.user + times.system

    def measure() -> dict:
        time.sleep(3)  # past the workers' start
        kids = me.children(recursive=True)
        before, t0 = (cpu(me), sum(cpu(k) for k in kids)), time.perf_counter()
        time.sleep(seconds)
        after, wall = (cpu(me), sum(cpu(k) for k in kids)), time.perf_counter() - t0
        return {"search_process_pct": round(100 * (after[0] - before[0]) / wall, 1),
                "workers_and_nannies_pct": round(100 * (after[1] - before[1]) / wall, 1)}

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, resources=parallel.RESOURCE, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster):  # a client, as the search has
        default = measure()
    with parallel.trial_runner(Search(workers=2, batch_size=2)) as runner:
        settings = runner.client.run(lambda: {k: dask.config.get(k) for k in parallel.QUIET})
        assert all(seen == parallel.QUIET for seen in settings.values()), settings  # the workers got them
        quiet = measure()
    return {"dask_defaults": default, "memcontrol": quiet, "settings": parallel.QUIET, "seconds": seconds}


def pooled(runs: list[dict]) -> dict:
    """Trials per hour over all repeats of each worker count (total trials / total trial-loop time),
    the speed-up of 2 workers over 1 from those, and each repeat's own speed-up."""
    def rate(workers: int, key: str = "trial_loop_s") -> float:
        mine = [r for r in runs if r["workers"] == workers]
        return sum(r["n_trials"] for r in mine) / sum(r[key] for r in mine) * 3600

    per_repeat = {}
    for r in runs:
        per_repeat.setdefault(r["repeat"], {})[r["workers"]] = r["trials_per_hour"]
    return {"trials_per_hour": {"1": round(rate(1), 1), "2": round(rate(2), 1)},
            "speedup_trials_per_hour": round(rate(2) / rate(1), 2),
            "speedup_search_wall": round(rate(2, "search_wall_s") / rate(1, "search_wall_s"), 2),
            "speedup_per_repeat": [round(v[2] / v[1], 2) for _, v in sorted(per_repeat.items())]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=13, help="search.n_trials (params.yaml's default: 3 anchors, then 4, 4, 2)")
    ap.add_argument("--batch-size", type=int, default=4, help="search.batch_size (params.yaml's default)")
    ap.add_argument("--steps", type=int, default=60, help="train.steps of each trial")
    ap.add_argument("--repeats", type=int, default=2, help="searches per worker count, interleaved (1, 2, 1, 2 ...)")
    ap.add_argument("--tiny", action="store_true", help="micro configuration: checks the script, measures nothing")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a fresh temp folder, removed after")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale_out.json")
    args = ap.parse_args()
    tmp = args.workdir or Path(tempfile.mkdtemp(prefix="scale_out-"))
    os.environ.setdefault("PREFECT_HOME", str(tmp / ".prefect"))
    pg_dir = tmp / "postgres"
    t_all = time.perf_counter()
    url = subprocess.run(["bash", str(ROOT / "scripts" / "postgres.sh"), "start", str(pg_dir), str(_free_port())],
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    try:
        params = base_params(args.tiny, args.trials, args.steps, args.batch_size)
        t0 = time.perf_counter()
        prepare_workdir(tmp / "prepared", params)
        setup = time.perf_counter() - t0
        pair = side_by_side(tmp / "prepared", tmp / "side_by_side")
        with prefect_server(tmp / ".prefect"):
            runs = []
            for k in range(args.repeats):  # interleaved, so a slow spell of the host hits both alike
                runs.append({"repeat": k, **run_search(tmp / "prepared", tmp / f"w1-{k}", workers=1)})
                runs.append({"repeat": k, **run_search(tmp / "prepared", tmp / f"w2-{k}", workers=2, storage=url,
                                                       study_name=f"scale-out-2-{k}")})
            overhead = {
                "storage_per_trial_s": {"sqlite": round(storage_overhead(f"sqlite:///{tmp / 'overhead.db'}"), 4),
                                        "postgresql": round(storage_overhead(url), 4)},
                **dask_overhead(),
                "idle_cluster_cpu": idle_cluster_cpu(),
            }
        overhead["postgresql_minus_sqlite_per_trial_s"] = round(
            overhead["storage_per_trial_s"]["postgresql"] - overhead["storage_per_trial_s"]["sqlite"], 4)
    finally:
        subprocess.run(["bash", str(ROOT / "scripts" / "postgres.sh"), "stop", str(pg_dir)], check=False)
    result = {
        "setting": ("TINY: micro configuration, a check that the script runs end to end; not a measurement"
                    if args.tiny else "cheap search: params.yaml with the overrides below"),
        "command": command_line("scale_out.py", args.workdir),
        "overrides": {"search.n_trials": args.trials, "search.batch_size": args.batch_size,
                      **({} if args.tiny else {"train.steps": args.steps})},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(terse=True),
                    "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "torch_threads_per_worker": 1,
        "runs": runs,
        "repeats": args.repeats,
        **pooled(runs),
        "goal_speedup": 1.6,
        "overhead": overhead,
        "one_trial_alone_and_two_side_by_side": pair,
        "setup_s": round(setup, 1),
        "total_wall_s": round(time.perf_counter() - t_all, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.workdir is None:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [("repeat", "workers", "storage", "trials", "loop s", "trials/h", "s/trial in worker", "search wall s")]
    rows += [(str(r["repeat"]), str(r["workers"]), r["storage"], str(r["n_trials"]), str(r["trial_loop_s"]), str(r["trials_per_hour"]),
              str(r["seconds_per_trial_in_worker"]), str(r["search_wall_s"])) for r in result["runs"]]
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, width)))
    print(f"speed-up (trials/h over all repeats): {result['speedup_trials_per_hour']}x (goal >= 1.6x); per repeat "
          f"{result['speedup_per_repeat']}; search wall: {result['speedup_search_wall']}x")
    print("overhead per trial:", json.dumps(overhead))
    print("the same trial in plain processes, alone and two at once:", json.dumps(pair))
    for r in result["runs"]:
        print(f"CPU split, repeat {r['repeat']}, {r['workers']} worker(s):", json.dumps(r["cpu_split"]))
    print(f"{result['setting']}\nwrote {args.out} ({result['total_wall_s']} s)")


if __name__ == "__main__":
    main()
