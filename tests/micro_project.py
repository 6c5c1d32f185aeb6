"""A fresh clone of the project, as a newcomer has it after `bash scripts/setup.sh`, on the micro
configuration: the repository's files (tracked and new, not ignored) copied into a new git
repository with one commit, the setup's .venv linked in, params.yaml = the project's params with
tests/micro_params.yaml over it. Commands run through bash with a PATH that has no venv on it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def micro_params() -> dict:
    return merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                 yaml.safe_load((ROOT / "tests" / "micro_params.yaml").read_text()))


def clone(dest: Path) -> Path:
    """The project as a fresh clone at `dest` (a git repository with one commit), micro params."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file() and not name.startswith("tests/"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(micro_params(), sort_keys=False))
    os.symlink(ROOT / ".venv", dest / ".venv")  # what `bash scripts/setup.sh` made
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "newcomer@example.org"],
                ["git", "config", "user.name", "newcomer"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def newcomer_env(dest: Path) -> dict:
    """A login shell's environment: system PATH only (no venv), no project variables."""
    keep = {k: os.environ[k] for k in ("HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "TERM") if k in os.environ}
    return {**keep, "PATH": SYSTEM_PATH}


def shell(script: str, cwd: Path, timeout: int = 1800) -> str:
    """Run `script` as written in bash (-e: stop at the first failing line), return its output."""
    r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=newcomer_env(cwd),
                       capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{script!r} failed ({r.returncode}):\n{out[-6000:]}"
    return out


def readme_block(heading: str, containing: str) -> str:
    """The first ```bash block of README.md after `heading` that contains `containing`."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(heading):]
    for block in re.findall(r"```bash\n(.*?)```", after, flags=re.S):
        if containing in block:
            return block
    raise AssertionError(f"README.md: no bash block with {containing!r} after {heading!r}")


def user_dataset(folder: Path) -> tuple[Path, Path]:
    """A user's dataset as it arrives: the 17 real X-rays of the installed packages in `folder/images`
    and `folder/reports.csv` (path,text: a distinct real IU report agreeing with each image's label)."""
    import pandas as pd

    from memcontrol.data import reports
    from real_xrays import real_images

    (folder / "images").mkdir(parents=True)
    iu = reports.load_iu_reports()
    pools = {label: [t for _, t in reports.report_candidates(iu, label)] for label in reports.REAL_LABELS}
    rows = []
    for im in real_images():
        shutil.copy(im.file, folder / "images" / im.file.name)
        rows.append({"path": f"images/{im.file.name}", "text": pools[im.label].pop(0)})
    pd.DataFrame(rows).to_csv(folder / "reports.csv", index=False)
    return folder / "reports.csv", folder
