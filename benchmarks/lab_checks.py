"""benchmarks/lab_scale.py's accounting: where each trial's time goes at one concurrency level, the
checks that no trial was lost or duplicated, the overhead model, and the markdown table."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

# the driver's serial work per trial, in the order of a batch's cycle
SERIAL = ("ask", "tell", "storage_other", "prefect_submit", "mlflow")


def _mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else 0.0


def summarize_level(workers: int, n_trials: int, seconds: float, out: dict) -> dict:
    """A batch's cycle is the driver's serial work for its W trials (ask, tell, other study reads and
    writes, submitting each Prefect task, logging each MLflow child) plus the parallel phase (every
    trial's dispatch, heartbeat, evaluation and return). Overhead per trial = the worker-seconds not
    spent evaluating, per trial: W * wall / n - trial_seconds = W * (serial per trial) + (parallel
    phase - trial_seconds) when every batch is full."""
    trials, batches, timers, wall = out["trials"], out["batches"], out["timers"], out["wall"]
    n = len(trials)
    pre = sum(b["submitted"] - b["start"] for b in batches)
    post = sum(b["end"] - b["received"] for b in batches)
    submit, mlflow = sum(t["submit_call"] for t in trials), sum(t["mlflow"] for t in trials)
    between = wall - sum(timers["evaluate"]) - sum(timers["ask"]) - sum(timers["tell"])
    log_task = sum(t["prefect_log_task"] for t in trials)
    serial = {"ask": sum(timers["ask"]) / n, "tell": sum(timers["tell"]) / n,
              # fail_stale, get_trials, set_user_attr, the first heartbeat, and the outcome bookkeeping
              "storage_other": (between + (pre - submit) + (post - mlflow - log_task)) / n,
              "prefect_submit": (submit + log_task) / n, "mlflow": mlflow / n}
    phases = [b["received"] - b["submitted"] - seconds for b in batches]
    parallel = _mean(phases)
    overhead = workers * wall / n - seconds
    # steady state: a batch's cycle from one evaluate's start to the next (the last to the loop's
    # end), leaving out the first batch, which pays each worker's first Prefect task run
    starts = [b["start"] for b in batches] + [out["end"]]
    cycles = [(b - a) * workers / size for a, b, size in zip(starts, starts[1:], (b["size"] for b in batches))]
    steady = _mean(cycles[1:]) - seconds if len(cycles) > 1 else None
    asks = timers["ask"]
    return {
        "workers": workers, "n_trials": n_trials, "evaluated": n, "batches": len(batches),
        "wall_seconds": round(wall, 2), "ideal_seconds": round(len(batches) * seconds, 2),
        "trials_per_hour": round(3600 * n / wall, 1),
        "overhead_per_trial": round(overhead, 3),
        "overhead_per_trial_first_batch": round(cycles[0] - seconds, 3),
        "overhead_per_trial_steady": None if steady is None else round(steady, 3),
        "driver_cpu_per_trial": round(out["driver_cpu"] / n, 4),
        "serial_per_trial": {k: round(v, 4) for k, v in serial.items()},
        "serial_total_per_trial": round(sum(serial.values()), 4),
        "contribution": {**{k: round(workers * v, 3) for k, v in serial.items()}, "parallel_phase": round(parallel, 3)},
        "parallel_phase": round(parallel, 3),
        # the first batch pays each worker process's one-off setup (its study connection)
        "parallel_phase_first_batch": round(phases[0], 3),
        "parallel_phase_later_batches": round(_mean(phases[1:]), 3) if len(phases) > 1 else None,
        "prefect_submit_split": {"trial_task_submit": round(submit / n, 4), "log_trial_task_wrapper": round(log_task / n, 4)},
        "mlflow_on_worker_mean": round(_mean(t.get("mlflow_on_worker", 0.0) for t in trials), 3),
        "latency_mean": {  # inside the parallel phase, per trial
            "dispatch": round(_mean(t["entered"] - t["submitted"] for t in trials), 3),
            "heartbeat_setup": round(_mean(t["started"] - t["entered"] for t in trials), 3),
            "compute": round(_mean(t["compute_seconds"] for t in trials), 4),
            "heartbeat_stop": round(_mean(t["left"] - t["ended"] for t in trials), 3),
            "return": round(_mean(t["received"] - t["left"] for t in trials), 3),
            "dispatch_max": round(max(t["entered"] - t["submitted"] for t in trials), 3),
        },
        "ask_first_batch": round(_mean(asks[:workers]), 4), "ask_last_batch": round(_mean(asks[-workers:]), 4),
        "worker_pids": len({t["pid"] for t in trials}),
    }


def _prefect_task_runs(flow_run_id: str) -> dict[str, int]:
    """COMPLETED / other stand-in task runs the Prefect server recorded for the flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    counts: dict[str, int] = {}
    with get_client(sync_client=True) as client:
        runs, offset = [], 0
        while page := client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                            limit=200, offset=offset):
            runs += page
            offset += len(page)
    for run in runs:
        if run.name.startswith("stand_in_trial"):
            key = run.state.type.value if run.state else "NONE"
            counts[key] = counts.get(key, 0) + 1
    return counts


def check_level(out: dict, n_trials: int, storage_url: str, params_path: Path, workdir: Path) -> dict:
    """No trial lost or duplicated: the study, MLflow and Prefect each hold every evaluated trial once."""
    import optuna
    from mlflow.tracking import MlflowClient

    from memcontrol import search as S
    from memcontrol.config import load_params
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=out["study"], storage=storage_url)
    trials = study.get_trials(deepcopy=False)
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
    complete = S.completed(study)
    digests = [t.user_attrs["mask_digest"] for t in complete]
    evaluated = [t["number"] for t in out["trials"]]
    params = load_params(params_path)
    client = MlflowClient(params.tracking.mlflow_uri)
    exp = client.get_experiment_by_name(params.tracking.experiment)
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{out['parent']}'",
                                  max_results=5000)
    names = [r.info.run_name for r in children]
    deadline, prefect = time.monotonic() + 90, {}
    while time.monotonic() < deadline:  # task-run states reach the server as events: wait until they settle
        prefect = _prefect_task_runs(out["flow_run_id"])
        if prefect.get("COMPLETED", 0) >= len(evaluated):
            break
        time.sleep(3)
    checks = {
        "study_states": states,
        "complete_scored": len(complete),
        "answered_duplicates": sum("duplicate_of" in t.user_attrs for t in trials),
        "complete_equals_n_trials": len(complete) == n_trials,
        "distinct_configurations": len(set(digests)) == len(digests),
        "each_trial_evaluated_once": len(set(evaluated)) == len(evaluated) and set(evaluated) == {t.number for t in complete},
        "none_running_or_failed": not any(k in states for k in ("RUNNING", "WAITING", "FAIL")),
        "mlflow_children": len(names),
        "mlflow_one_child_per_trial": sorted(names) == sorted(f"trial-{k:03d}" for k in evaluated),
        "prefect_task_runs": prefect,
        "prefect_one_completed_task_per_trial": prefect.get("COMPLETED", 0) == len(evaluated) and len(prefect) == 1,
        "heartbeats_recorded_by_workers": sum("worker" in t.user_attrs for t in complete) == len(complete),
    }
    checks["ok"] = all(v for k, v in checks.items() if isinstance(v, bool))
    return checks


def model(levels: list[dict], target_seconds: float) -> dict:
    """Overhead per trial = L + W * s (s: the driver's serial seconds per trial, L: the parallel
    phase beyond the evaluation). Where it reaches `target_seconds`, with s and L as measured at the
    largest level (s grows with W in these runs, so this is an upper bound on W*), and with a least-
    squares line through all levels."""
    import numpy as np

    top = levels[-1]
    s, latency = top["serial_total_per_trial"], top["parallel_phase"]
    w = np.array([lv["workers"] for lv in levels], float)
    steady = lambda lv: lv["overhead_per_trial_steady"] if lv["overhead_per_trial_steady"] is not None \
        else lv["overhead_per_trial"]  # noqa: E731
    o = np.array([steady(lv) for lv in levels], float)
    slope, intercept = np.polyfit(w, o, 1) if len(levels) > 1 else (s, latency)
    reached = [lv["workers"] for lv in levels if steady(lv) >= target_seconds]
    share = {k: v / sum(top["contribution"].values()) for k, v in top["contribution"].items()}
    cpu = top["driver_cpu_per_trial"]
    return {
        "target_seconds": target_seconds,
        "reached_at_measured_workers": reached[0] if reached else None,
        # 0: the parallel phase (or the intercept) alone is over the target already
        "workers_at_target_top_level_costs": round(max(0.0, (target_seconds - latency) / s), 1) if s > 0 else None,
        "workers_at_target_linear_fit": round(max(0.0, (target_seconds - intercept) / slope), 1) if slope > 0 else None,
        "fit": {"intercept": round(float(intercept), 3), "slope_per_worker": round(float(slope), 4)},
        "bottleneck": max(top["contribution"], key=top["contribution"].get),
        "share_at_top_level": {k: round(v, 3) for k, v in share.items()},
        # the driver's own CPU seconds per trial: what its serial work would cost on an idle machine
        # (waits on the databases and servers and the parallel phase left out: an optimistic bound)
        "workers_at_target_driver_cpu_only": round(target_seconds / cpu, 1) if cpu > 0 else None,
        # a loop that asks a trial whenever one ends (no batch barrier) keeps W workers busy while the
        # driver's serial work for W trials fits in one trial: W = 60 s / s
        "pipelined_driver_saturation_workers_60s": round(60 / s, 0) if s > 0 else None,
        "pipelined_driver_saturation_workers_60s_driver_cpu_only": round(60 / cpu, 0) if cpu > 0 else None,
    }


def render(result: dict) -> str:
    ms = lambda x: f"{1000 * x:.0f}"  # noqa: E731
    lines = ["| workers | trials | wall s | trials/h | overhead/trial s | % of 60 s | ask ms | tell ms | other storage ms"
             " | Prefect submit ms | MLflow ms | parallel phase − T s | dispatch s | steady overhead/trial s"
             " | driver CPU ms/trial | checks |",
             "|" + "---|" * 16]
    extra = [result["mlflow_on_workers"]] if "mlflow_on_workers" in result else []
    for lv in result["levels"] + extra:
        sp = lv["serial_per_trial"]
        label = f"{lv['workers']}" + (" (MLflow on workers)" if lv.get("mlflow_logged_by") == "worker" else "")
        lines.append(f"| {label} | {lv['evaluated']} | {lv['wall_seconds']:.1f} | {lv['trials_per_hour']:.0f} | "
                     f"{lv['overhead_per_trial']:.2f} | {100 * lv['overhead_per_trial'] / 60:.1f} | {ms(sp['ask'])} | "
                     f"{ms(sp['tell'])} | {ms(sp['storage_other'])} | {ms(sp['prefect_submit'])} | {ms(sp['mlflow'])} | "
                     f"{lv['parallel_phase']:.2f} | {lv['latency_mean']['dispatch']:.2f} | "
                     f"{'-' if lv['overhead_per_trial_steady'] is None else format(lv['overhead_per_trial_steady'], '.2f')} | "
                     f"{ms(lv['driver_cpu_per_trial'])} | {'ok' if lv['checks']['ok'] else 'FAILED'} |")
    m = result["model"]
    lines += ["", f"Model: overhead/trial = L + W·s. 5 % of a 60 s trial ({m['target_seconds']:.0f} s) is reached at "
              f"W ≈ {m['workers_at_target_top_level_costs']} (costs at the largest level), "
              f"W ≈ {m['workers_at_target_linear_fit']} (line through all levels), W ≈ {m['workers_at_target_driver_cpu_only']} "
              f"(the driver's CPU time only, an idle machine's bound); measured: "
              f"{m['reached_at_measured_workers'] or 'not reached'}. Bottleneck: {m['bottleneck']}.", ""]
    w = result.get("writers", {})
    if w:
        lines += ["| 32 writers | study ops ok / failed | study p50 / p95 s | MLflow children ok / failed | "
                  "MLflow p50 / p95 s | errors | lost or extra |", "|---|---|---|---|---|---|---|"]
        for name, c in w.items():
            st, ml = c["study"], c["mlflow"]
            lines.append(f"| {name} | {st['ok']} / {st['failed']} | {st['p50']:.2f} / {st['p95']:.2f} | {ml['ok']} / "
                         f"{ml['failed']} | {ml['p50']:.2f} / {ml['p95']:.2f} | "
                         f"{'; '.join(f'{k} x{v}' for k, v in c['errors'].items()) or '-'} | "
                         f"{c['lost_or_extra']} |")
    return "\n".join(lines) + "\n"
