"""`memcontrol` console script: one subcommand per pipeline stage (each runs its Prefect flow)."""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import typer

from memcontrol import offline

offline.apply()  # before prefect/mlflow/transformers are imported

def _logging() -> None:
    """memcontrol's log (progress included, tasks/progress.py): rich on a terminal, plain
    timestamped lines otherwise (a log file, CI, `dvc repro`), one line per record, never wrapped."""
    from rich.console import Console
    from rich.logging import RichHandler

    if Console(stderr=True).is_terminal:
        h = RichHandler(show_path=False, rich_tracebacks=False)
    else:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    lg = logging.getLogger("memcontrol")
    if not lg.handlers:
        lg.addHandler(h)
        lg.setLevel(os.environ.get("MEMCONTROL_LOG_LEVEL", "INFO"))
        lg.propagate = False


app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="MemControl: search which UNet blocks to fine-tune so a diffusion model memorizes less.")

ParamsOpt = typer.Option("params.yaml", "--params", "-p", help="params.yaml to read")
RootOpt = typer.Option(None, "--root", help="working directory for outputs (default: params `workdir`)")


# OSErrors that say the environment, not the code, is at fault: a missing input file (an earlier
# stage not run), no permission, a full disk or quota.
ENVIRONMENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class _HeldErrors(logging.Filter):
    """Prefect logs a failed run's traceback at ERROR before the CLI sees the exception. Those records
    are held back: a user error then ends in its one line, while a bug (and a run that succeeded
    after catching a failed task) gets them all, in order."""

    LOGGERS = ("prefect.flow_runs", "prefect.task_runs")

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            self.held.append(record)
            return False
        return True

    def __enter__(self):
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc):
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)

    def release(self) -> None:
        """Emit the held records (a bug: the user needs Prefect's log). The filters come off first, or
        each re-emitted record would be held again while the list is walked."""
        self.__exit__()
        held, self.held = self.held, []
        for record in held:
            logging.getLogger(record.name).handle(record)


def user_error(e: BaseException) -> int | None:
    """The exit code for a user's error (bad input, settings or environment), None for a bug.
    MEMCONTROL_TRACEBACK=1 treats every error as a bug (to see where a message came from)."""
    from memcontrol.config import ConfigError
    from memcontrol.errors import UserError

    if os.environ.get("MEMCONTROL_TRACEBACK") == "1":
        return None
    if isinstance(e, ConfigError):
        return 2
    if isinstance(e, UserError) or (isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS):
        return 1
    return None


def describe(e: BaseException) -> str:
    """The one line a user error prints (after the command's name)."""
    return str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename}"


def _fail(name: str, e: BaseException, code: int):
    typer.secho(f"{name}: {describe(e)}", fg="red", err=True)
    raise typer.Exit(code)


def _run(name: str, params: str, root: str | None, module: str = "pipeline", **options):
    from memcontrol.config import ConfigError, load_params

    _logging()
    try:
        config = load_params(params)  # fail fast with the file and key named, before Prefect starts
    except ConfigError as e:
        _fail(name, e, 2)
    from memcontrol.atomic import clean_leftovers

    workdir = Path(root or config.workdir)
    if workdir.is_dir():  # what writers killed in an earlier run left (temp files of dead processes)
        for leftover in clean_leftovers(workdir):
            logging.getLogger("memcontrol").info("removed %s, left by a killed writer", leftover)
    import importlib

    flows_module = importlib.import_module(f"flows.{module}")

    t0 = time.perf_counter()
    with _HeldErrors() as held:
        try:
            out = getattr(flows_module, name)(params_path=params, root=root, **options)
        except Exception as e:  # a user error: its message alone; a bug: Prefect's log and the traceback
            if (code := user_error(e)) is not None:
                _fail(name, e, code)
            held.release()
            raise
        held.release()
    typer.secho(f"{name}: done in {time.perf_counter() - t0:.1f}s", fg="green", err=True)
    return out


@app.command()
def prepare(params: str = ParamsOpt, root: str = RootOpt):
    """Build (embedded default) or ingest (CSV) the dataset into data/processed/manifest.parquet."""
    _run("prepare", params, root)


@app.command()
def base(params: str = ParamsOpt, root: str = RootOpt,
         pretrain: bool = typer.Option(False, "--pretrain", help="pretrain even when the committed tiny base's recipe matches")):
    """The base model into models/base/: check model.path, or the tiny default (the committed copy
    when its recipe matches these params and data, else pretrained)."""
    _run("base", params, root, force_pretrain=pretrain)


@app.command()
def reference(params: str = ParamsOpt, root: str = RootOpt):
    """Encode the dataset, build the FAISS index, calibrate the memorization threshold."""
    _run("reference", params, root)


@app.command()
def search(params: str = ParamsOpt, root: str = RootOpt):
    """Run (or resume) the Optuna study; save the Pareto front and the selected mask."""
    _run("search", params, root)


@app.command()
def select(params: str = ParamsOpt, root: str = RootOpt):
    """Re-apply the selection rule to the finished study."""
    _run("select", params, root)


@app.command()
def finetune(params: str = ParamsOpt, root: str = RootOpt):
    """Stage 2: fine-tune with the selected mask into models/final/."""
    _run("finetune", params, root)


@app.command()
def compare(params: str = ParamsOpt, root: str = RootOpt):
    """Evaluate the final model against full fine-tuning; write reports/."""
    _run("compare", params, root)


@app.command()
def audit(params: str = ParamsOpt, root: str = RootOpt):
    """Audit the selected mask against full FT, each PEFT method and the mitigations (audit.arms x audit.seeds)."""
    _run("audit", params, root, module="audit")


@app.command()
def transfer(params: str = ParamsOpt, root: str = RootOpt):
    """Apply the saved mask to the transfer dataset (CT/MR slices) and audit it under transfer/."""
    _run("transfer", params, root, module="audit")


@app.command()
def release(params: str = ParamsOpt, root: str = RootOpt):
    """Generate a synthetic dataset from models/final, excluding samples too close to training images."""
    _run("release", params, root, module="audit")


@app.command()
def export(out: str = typer.Argument(..., help="folder to write (new, empty, or an earlier export)"),
           seed: int = typer.Option(None, "--seed", help="which models/final/seed<N> (default: the first of final.seeds)"),
           params: str = ParamsOpt, root: str = RootOpt):
    """Write the final model as a diffusers folder (adapter merged; LoRA also in diffusers' format) with a model card."""
    _run("export", params, root, module="export", out=str(Path(out).resolve()), seed=seed)


@app.command()
def demo(params: str = ParamsOpt, root: str = RootOpt):
    """Run every stage on the embedded default and print where everything is."""
    t0 = time.perf_counter()
    _run("demo", params, root)
    summary(params, root, wall=time.perf_counter() - t0)


@app.command()
def serve(params: str = ParamsOpt, root: str = RootOpt,
          cron: list[str] = typer.Option([], "--cron", help='put a flow on a schedule: FLOW=CRON, e.g. "search=0 2 * * *" (repeatable)'),
          limit: int = typer.Option(1, "--limit", help="flow runs executed at once by this process")):
    """Register every flow as a deployment on the Prefect server at PREFECT_API_URL and run what the
    UI (or a schedule, or the API) starts, until Ctrl-C."""
    from flows import serve as deploy
    from memcontrol.config import ConfigError, load_params

    _logging()
    try:
        load_params(params)
        schedules = deploy.parse_schedules(cron)
        deploy.serve(params, root, schedules, limit)
    except ConfigError as e:
        _fail("serve", e, 2)
    except deploy.ServeError as e:
        _fail("serve", e, 2)


def summary(params: str, root: str | None, wall: float | None = None):
    from rich.console import Console
    from rich.table import Table

    from memcontrol.config import load_params
    from memcontrol.workdir import Layout

    config = load_params(params)
    layout = Layout(Path(root or config.workdir).resolve())
    con = Console()
    metrics = json.loads((layout.reports / "metrics.json").read_text())
    info = json.loads(layout.selected_info.read_text())
    table = Table(title="MemControl summary")
    for column in ("arm", "trainable %", "memorized (flagged)", "own-image match", "mean NN sim", "KID", "FID"):
        table.add_column(column, justify="right" if column != "arm" else "left")

    def fmt(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    for arm, m in metrics.items():
        table.add_row(arm, fmt(m.get("trainable_pct"), ".4f"), fmt(m.get("mem.flagged_rate")),
                      fmt(m.get("mem.own_match_rate")), fmt(m.get("mem.mean_sim")), fmt(m.get("quality.kid_mean"), ".4f"),
                      fmt(m.get("quality.fid"), ".2f"))
    con.print(table)
    con.print(f"[bold]Chosen mask[/] (trial {info['trial']}): {', '.join(info['enabled_blocks']) or '(none)'}")
    rows = [
        ("manifest", layout.manifest), ("base model (diffusers folder)", layout.base),
        ("base samples", layout.reports / "base_samples.png"),
        ("FAISS index + threshold", layout.reference), ("Optuna study (SQLite)", layout.study_db),
        ("trials table", layout.search / "trials.csv"), ("Pareto front", layout.search / "pareto.csv"),
        ("Pareto plot", layout.search / "pareto.png"), ("selected mask", layout.selected),
        ("final model (adapter)", layout.final),
        ("comparison report", layout.reports / "compare.md"), ("metrics (DVC)", layout.reports / "metrics.json"),
        ("MLflow store", config.tracking.mlflow_uri),
    ]
    for k, v in rows:
        con.print(f"  {k:32s} {v}")
    con.print("  MLflow UI: mlflow ui --backend-store-uri sqlite:///mlflow.db --workers 1  (http://127.0.0.1:5000)")
    timings = layout.reports / "demo_timings.json"
    if timings.exists():
        st = json.loads(timings.read_text())
        setup = f"setup {st['setup_seconds']:.0f} s, " if "setup_seconds" in st else ""
        con.print("  stage wall times: " + setup + ", ".join(f"{k} {st['seconds'][k]:.0f} s" for k in st["order"]))
        if wall is not None:  # the whole `memcontrol demo` process, for benchmarks/default_run.py
            from memcontrol.workdir import write_json

            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            write_json({**st, "wall_seconds": round(wall, 1), "peak_rss_mb": round(peak_mb)}, timings)
    trials = layout.search / "trials.csv"
    if trials.exists():
        import pandas as pd

        w = pd.read_csv(trials)["wall_seconds"]
        con.print(f"  per trial (fine-tune + evaluate): mean {w.mean():.1f} s, min {w.min():.1f} s, max {w.max():.1f} s "
                  f"over {len(w)} trials")
    if wall is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        con.print(f"  wall time {wall / 60:.1f} min, peak RSS {peak:.0f} MiB")


@app.command("summary")
def summary_cmd(params: str = ParamsOpt, root: str = RootOpt):
    """Print the summary table of a finished run."""
    summary(params, root)


if __name__ == "__main__":
    sys.exit(app())
