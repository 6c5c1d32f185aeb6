"""Pretrain the embedded default's tiny base model from params.yaml and commit it with its recipe
(memcontrol/models/pretrained.py). Run by maintainers when model.tiny, model.base_train, the seed,
the demo's base data or the pretraining code change; the demo then loads the committed copy instead
of spending minutes pretraining. Writes benchmarks/results/pretrain_base.json (timings).

Usage: python scripts/pretrain_base.py [--params params.yaml] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import json
import platform
import time
from pathlib import Path

import torch

from memcontrol import offline

offline.apply()

from memcontrol.base_model import pretrain  # noqa: E402
from memcontrol.config import load_params  # noqa: E402
from memcontrol.models import pretrained  # noqa: E402
from memcontrol.prepare import prepare  # noqa: E402
from memcontrol.workdir import Layout, read_manifest, rows_of  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pretrain-base")
    args = ap.parse_args()
    params = load_params(args.params)
    layout = Layout(args.workdir)
    t0 = time.perf_counter()
    prepare(params, layout)
    rows = rows_of(read_manifest(layout), "base")
    t1 = time.perf_counter()
    bundle = pretrain(params, layout, rows)
    seconds = time.perf_counter() - t1
    info = {"pretrain_seconds": round(seconds, 1), "prepare_seconds": round(t1 - t0, 1),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "n_base_rows": int(len(rows)), "n_unet_rows": int((rows["subset"] == "").sum())}
    out = pretrained.save_committed(bundle, pretrained.recipe(params, rows), info)
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/pretrain_base.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"committed base written to {out} ({seconds:.0f} s of pretraining)")


if __name__ == "__main__":
    main()
