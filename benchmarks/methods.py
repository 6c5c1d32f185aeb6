"""Per PEFT method: trainable parameters, apply time, one training step's time and peak memory, and
one sampling pass's time, on the tiny default UNet (CPU by default).

    .venv/bin/python benchmarks/methods.py [--device cpu] [--threads 1] [--out benchmarks/results/methods.json]

Each method is applied as its whole-UNet baseline (reference mode, no blocks: what the paper's
method columns are), and the full-mode all-blocks-on count is printed beside it. A training step is
noise-MSE + AdamW on a batch of ``--batch`` latents; its time is the median over ``--steps`` steps
after the first two, and its peak memory is measured over the first two steps (gradients, AdamW
state and SV-Diff's W_delta cache are allocated there) above their start: from torch's allocation events (profiler) on CPU,
``torch.cuda.max_memory_allocated`` on CUDA. A sampling pass is
``--sample-steps`` DDIM steps at batch ``--batch`` with classifier-free guidance (2x batch per UNet
call), no VAE. ``adapter_mb`` is the memory ``apply`` added (e.g. SV-Diff's SVD factors), counted from the UNet's
parameters and buffers; ``adapter_alloc_mb`` the allocator's net change across ``apply`` (a cross-check).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memcontrol.tuning import METHODS, Mask, apply, count_parameters, mask_for_model  # noqa: E402

METHOD_ORDER = ("full", "attention", "bias", "norm", "lora", "svdiff", "difffit")


def tiny_config(**overrides) -> dict:
    """The tiny default UNet (the lead's model preset may change; pass overrides)."""
    cfg = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=384,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    cfg.update(overrides)
    return cfg


class Memory:
    """Peak and net memory allocated inside a ``with`` block, above its start.

    CUDA: the caching allocator's statistics. CPU: torch's allocation events from the profiler
    (``profile_memory=True``), summed in time order; RSS would miss reuse of freed heap.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self.net = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            self.net = torch.cuda.memory_allocated(self.device) - self._start
            return
        self._prof.__exit__(*exc)
        # "[memory]" events carry frees (and allocations outside ops); op events their own allocations.
        events = sorted(
            (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
            for e in self._prof.events()
        )
        running = list(itertools.accumulate(b for _, b in events if b)) or [0]
        self.peak, self.net = max(0, max(running)), running[-1]


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages of a module's parameters and buffers: what an adapter adds,
    counted from the tensors themselves. (The allocator's net change across `apply`, kept as
    adapter_alloc_mb, also counts whatever else is freed meanwhile and went negative for LoRA in
    the fp16 SD-1.5 run: docs/performance.md "Memory".)"""
    seen = {}
    for t in [*module.parameters(), *module.buffers()]:
        st = t.untyped_storage()
        seen[(st.data_ptr(), t.device)] = st.nbytes()
    return sum(seen.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def bench_method(
    base: UNet2DConditionModel,
    mask: Mask,
    *,
    device: torch.device,
    batch: int,
    tokens: int,
    steps: int,
    sample_steps: int,
    precision: str = "fp32",
    grad_ckpt: bool = False,
    seed: int = 0,
) -> dict:
    """Apply ``mask`` to a copy of ``base`` and time a training step and a sampling pass."""
    cfg = base.config
    size = cfg.sample_size
    g = torch.Generator(device="cpu").manual_seed(seed)
    latents = torch.randn(batch, cfg.in_channels, size, size, generator=g).to(device)
    cond = torch.randn(batch, tokens, cfg.cross_attention_dim, generator=g).to(device)
    uncond = torch.zeros_like(cond)
    timesteps = torch.randint(0, 1000, (batch,), generator=g).to(device)
    noise = torch.randn(latents.shape, generator=g).to(device)

    unet = copy.deepcopy(base)
    gc.collect()  # garbage of the previous method freed now, not inside the measurement below
    if device.type == "cuda":
        torch.cuda.empty_cache()
    before = tensor_bytes(unet)
    t0 = time.perf_counter()
    with Memory(device) as added:
        prepared = apply(unet, mask)
    apply_s = time.perf_counter() - t0  # includes the profiler's overhead on CPU
    adapter_bytes = tensor_bytes(unet) - before
    if grad_ckpt:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(prepared.groups, betas=(0.9, 0.999), weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
    params = [p for grp in prepared.groups for p in grp["params"]]

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            pred = unet(latents, timesteps, cond).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()

    with Memory(device) as mem:  # step 1 allocates grads and AdamW state, step 2 SV-Diff's W_delta cache
        step()
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    opt.zero_grad(set_to_none=True)
    del opt

    unet.eval()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
    sched.set_timesteps(sample_steps)
    both = torch.cat([uncond, cond])

    def sample():
        z = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(device)
        with torch.no_grad(), _autocast(device, precision):
            for t in sched.timesteps:
                e_u, e_c = unet(torch.cat([z, z]), t, both).sample.chunk(2)
                z = sched.step(e_u + 4.0 * (e_c - e_u), t, z).prev_sample  # guidance 4 (docs/paper.md §4.3)
        return z

    with torch.no_grad(), _autocast(device, precision):
        unet(torch.cat([latents, latents]), timesteps[:1], both)  # warm-up (and SV-Diff's rebuild)
    _sync(device)
    t0 = time.perf_counter()
    sample()
    _sync(device)
    sample_s = time.perf_counter() - t0

    row = {
        "method": mask.method,
        "trainable": prepared.trainable,
        "pct": prepared.pct,
        "total": prepared.total,
        "apply_s": apply_s,
        "adapter_mb": adapter_bytes / 2**20,
        "adapter_alloc_mb": added.net / 2**20,
        "step_ms": 1000 * statistics.median(times),
        "step_peak_mb": mem.peak / 2**20,
        "sample_s": sample_s,
    }
    del unet, prepared, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run(
    config: dict,
    *,
    methods=METHOD_ORDER,
    device: str = "cpu",
    batch: int = 8,
    tokens: int = 16,
    steps: int = 3,
    sample_steps: int = 20,
    precision: str = "fp32",
    grad_ckpt: bool = False,
    lr: float = 1e-4,
    seed: int = 0,
    on_row=None,
    keep_going: bool = False,
) -> dict:
    """Benchmark every method on one randomly initialised UNet built from ``config``.

    ``on_row(result)`` is called after each method (e.g. to save partial results); with
    ``keep_going`` an out-of-memory method is recorded as an error row instead of raising.
    """
    dev = torch.device(device)
    t_start = time.perf_counter()
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "settings": {
            "batch": batch, "tokens": tokens, "timed_steps": steps, "sample_steps": sample_steps,
            "precision": precision, "grad_ckpt": grad_ckpt, "mask": "whole-UNet baseline (reference mode, no blocks)",
        },
        "rows": [],
    }
    if dev.type == "cuda":
        result["gpu_memory_gb"] = torch.cuda.get_device_properties(dev).total_memory / 2**30
    torch.manual_seed(seed)
    with dev:
        base = UNet2DConditionModel(**config).eval()
    for name in methods:
        baseline = Mask(name, (), (), lr, mode="reference")
        try:
            row = bench_method(
                base, baseline, device=dev, batch=batch, tokens=tokens, steps=steps,
                sample_steps=sample_steps, precision=precision, grad_ckpt=grad_ckpt, seed=seed,
            )
        except torch.OutOfMemoryError as err:
            if not keep_going:
                raise
            row = {"method": name, "error": f"out of memory: {str(err).splitlines()[0]}"}
            torch.cuda.empty_cache()
        row["trainable_full_mode"] = count_parameters(base, mask_for_model(base, name, lr))
        result["rows"].append(row)
        result["wall_s"] = time.perf_counter() - t_start
        print(_format_row(row), flush=True)
        if on_row is not None:
            on_row(result)
    return result


HEADER = (
    f"{'method':<10}{'trainable':>13}{'%':>9}{'full-mode':>12}{'apply s':>9}{'adapter MB':>11}"
    f"{'step ms':>10}{'step peak MB':>13}{'sample s':>10}"
)


def _format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['method']:<10}{r['error']}"
    return (
        f"{r['method']:<10}{r['trainable']:>13,}{r['pct']:>9.4f}{r.get('trainable_full_mode', 0):>12,}"
        f"{r['apply_s']:>9.2f}{r['adapter_mb']:>11.1f}{r['step_ms']:>10.1f}{r['step_peak_mb']:>13.1f}{r['sample_s']:>10.2f}"
    )


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="+", default=list(METHOD_ORDER), choices=sorted(METHODS))
    p.add_argument("--steps", type=int, default=3, help="timed training steps (after two untimed)")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--tokens", type=int, default=16, help="text tokens per prompt")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="autocast dtype")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/methods.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(HEADER)
    result = run(
        tiny_config(), methods=args.methods, device=args.device, batch=args.batch, tokens=args.tokens,
        steps=args.steps, sample_steps=args.sample_steps, precision=args.precision, grad_ckpt=args.grad_ckpt,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out} ({result['device']}, {result['threads']} threads)")


if __name__ == "__main__":
    main()
