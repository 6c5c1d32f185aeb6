"""Show, on CPU, the reference cycle that kept each fp16 fine-tune's optimizer alive on a GPU.

    python benchmarks/accelerate_cycle.py [--out benchmarks/results/accelerate_cycle.json]

accelerate wraps the optimizer in `AcceleratedOptimizer`; with a GradScaler (which `Accelerator`
creates for fp16 on a GPU only, so it cannot be built through `Accelerator` on CPU) the wrapper
stores `patch_optimizer_step(self, ...)`, a closure over itself. The wrapper, the AdamW it wraps,
AdamW's state and the parameters it holds are then freed only by Python's cyclic garbage
collector, not when the last name for them goes away. This builds the wrapper directly around an
AdamW of a small model, takes a step, drops every name and reports whether the AdamW object and
its state are still alive before and after `gc.collect()`; the same without a scaler (bf16/fp32).
"""

from __future__ import annotations

import argparse
import gc
import json
import weakref
from pathlib import Path

import accelerate
import torch
from accelerate.optimizer import AcceleratedOptimizer

ROOT = Path(__file__).resolve().parents[1]


def alive_after_drop(with_scaler: bool) -> dict:
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wrapped = AcceleratedOptimizer(opt, device_placement=False,
                                   scaler=torch.amp.GradScaler("cpu") if with_scaler else None)
    model(torch.randn(4, 256)).square().mean().backward()
    opt.step()
    state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                      if torch.is_tensor(v))
    ref = weakref.ref(opt)
    gc.disable()
    try:
        del model, opt, wrapped
        before = ref() is not None
        gc.collect()
        after = ref() is not None
    finally:
        gc.enable()
    return {"adamw_state_bytes": state_bytes, "alive_after_del": before, "alive_after_gc_collect": after}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/accelerate_cycle.json")
    a = ap.parse_args(argv)
    accelerate.Accelerator(cpu=True)  # the state AcceleratedOptimizer reads
    result = {"accelerate": accelerate.__version__, "torch": torch.__version__,
              "with_grad_scaler (fp16 on a GPU)": alive_after_drop(True),
              "without_grad_scaler (bf16, fp32)": alive_after_drop(False)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
