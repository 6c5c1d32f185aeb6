"""Generation speed options on CPU, each timed against the current default in the same process,
alternating, same prompts and seeds, on one torch thread; each scored with the trial's metrics.

    python benchmarks/gen_options.py --workdir W [--repeats 2] [--out benchmarks/results/gen_options.json]

The model is the base model fine-tuned once as a trial (all blocks, --train-steps, seed 0), so the
memorization and quality metrics have something to measure. Options: torch.inference_mode instead
of no_grad, channels_last UNet, bf16 autocast, torch.compile (CPU inductor; compile time reported
apart), and cheaper samplers (DPM-Solver++ 2M at 4 and 6 steps, DDIM at 6) against DDIM at
sample.steps; DDIM at 15 is the slower reference. Only the denoising loop is timed (CPU time of
the process, one thread) (the VAE decode,
embedding and scoring are the same for all); the decode is done once per option for the metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler  # noqa: E402

from memcontrol import tuning  # noqa: E402
from memcontrol.arms import search_rows  # noqa: E402
from memcontrol.base_model import load_base  # noqa: E402
from memcontrol.config import load_params  # noqa: E402
from memcontrol.sample import initial_noise  # noqa: E402
from memcontrol.train import finetune  # noqa: E402
from memcontrol.workdir import Layout  # noqa: E402
from obvious_trial import masks, score  # noqa: E402
from trial_profile import Clock, cpu_timed, eval_inputs, setup  # noqa: E402


def loop(unet, scheduler, text, null_text, seeds, *, steps, guidance, batch, grad_mode, autocast=None,
         channels_last=False) -> torch.Tensor:
    """memcontrol.sample.denoise's loop with the knobs exposed; returns latents."""
    c = unet.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    out = []
    for i in range(0, len(seeds), batch):
        cond = text[i:i + batch]
        b = len(cond)
        sched = scheduler()
        sched.set_timesteps(steps)
        z = initial_noise(shape, seeds[i:i + batch]) * sched.init_noise_sigma
        ctx = torch.cat([null_text.expand(b, -1, -1), cond])
        with grad_mode(), (torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()):
            for t in sched.timesteps:
                x = torch.cat([z, z])
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                eps = unet(x, t, encoder_hidden_states=ctx).sample.float()
                e_u, e_c = eps.chunk(2)
                z = sched.step(e_u + guidance * (e_c - e_u), t, z).prev_sample
        out.append(z.float().contiguous())
    return torch.cat(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=None, help="fine-tuning steps of the model (default train.steps)")
    ap.add_argument("--compile", action="store_true", help="also try torch.compile (minutes of compiling)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gen_options.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    params, layout = load_params(a.workdir / "params.yaml"), Layout(a.workdir)
    ctx, _ = setup(params, layout)
    sample = params.sample
    bundle = load_base(layout)
    mask = masks(params, layout)["all_blocks"]
    torch.manual_seed(params.seed)
    prepared = tuning.apply(bundle.unet, mask)
    finetune(bundle.unet, prepared.groups, ctx.encoded.train_data(search_rows(params, ctx)), bundle.scheduler,
             steps=a.train_steps or params.train.steps, batch_size=params.train.batch_size, seed=params.seed,
             cfg_dropout=params.train.cfg_dropout, grad_clip=params.train.grad_clip,
             weight_decay=params.train.weight_decay, device="cpu")
    unet = bundle.unet.eval()
    text, seeds, mem_p, n_mem = eval_inputs(ctx)
    null = ctx.encoded.null_text
    ddim = lambda: DDIMScheduler.from_config(bundle.scheduler.config, clip_sample=False)  # noqa: E731
    dpm = lambda: DPMSolverMultistepScheduler.from_config(bundle.scheduler.config, algorithm_type="dpmsolver++",  # noqa: E731
                                                          solver_order=2)
    cl_unet = None

    def channels_last_unet():
        nonlocal cl_unet
        if cl_unet is None:
            import copy

            cl_unet = copy.deepcopy(unet).to(memory_format=torch.channels_last)
        return cl_unet

    base_kw = dict(steps=sample.steps, guidance=sample.guidance, batch=sample.batch_size)
    options = {
        f"default: DDIM {sample.steps}, no_grad, fp32": lambda: loop(unet, ddim, text, null, seeds, grad_mode=torch.no_grad, **base_kw),
        "inference_mode": lambda: loop(unet, ddim, text, null, seeds, grad_mode=torch.inference_mode, **base_kw),
        "channels_last": lambda: loop(channels_last_unet(), ddim, text, null, seeds, grad_mode=torch.no_grad,
                                      channels_last=True, **base_kw),
        "bf16 autocast": lambda: loop(unet, ddim, text, null, seeds, grad_mode=torch.no_grad, autocast=torch.bfloat16, **base_kw),
        "DPM-Solver++ 2M, 6 steps": lambda: loop(unet, dpm, text, null, seeds, grad_mode=torch.no_grad,
                                                 **{**base_kw, "steps": 6}),
        "DPM-Solver++ 2M, 4 steps": lambda: loop(unet, dpm, text, null, seeds, grad_mode=torch.no_grad,
                                                 **{**base_kw, "steps": 4}),
        "DDIM 6 steps": lambda: loop(unet, ddim, text, null, seeds, grad_mode=torch.no_grad, **{**base_kw, "steps": 6}),
        "DDIM 15 steps (slower reference)": lambda: loop(unet, ddim, text, null, seeds, grad_mode=torch.no_grad,
                                                         **{**base_kw, "steps": 15}),
    }
    compile_info = None
    if a.compile:
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(unet)
            loop(compiled, ddim, text[:sample.batch_size], null, seeds[:sample.batch_size], grad_mode=torch.no_grad,
                 **base_kw)  # compile (first batch shape)
            loop(compiled, ddim, text[sample.batch_size:], null, seeds[sample.batch_size:], grad_mode=torch.no_grad,
                 **base_kw)  # the last, smaller batch recompiles
            compile_info = {"ok": True, "compile_and_first_pass_s": round(time.perf_counter() - t0, 1)}
            options["torch.compile (inductor)"] = lambda: loop(compiled, ddim, text, null, seeds,
                                                               grad_mode=torch.no_grad, **base_kw)
        except Exception as e:  # recorded, not kept
            compile_info = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                            "seconds": round(time.perf_counter() - t0, 1)}
        print("compile:", compile_info, flush=True)
    times: dict[str, list[float]] = {k: [] for k in options}
    walls: dict[str, list[float]] = {k: [] for k in options}
    latents = {}
    for _ in range(a.repeats):
        for name, fn in options.items():
            latents[name], wall, cpu = cpu_timed(fn)
            times[name].append(cpu)
            walls[name].append(wall)
            print(f"{name}: {cpu:.2f}s CPU", flush=True)
    ref_name = next(iter(options))
    ref_imgs = bundle.decode(latents[ref_name])
    rows = []
    for name in options:
        imgs = bundle.decode(latents[name])
        metrics = score(params, ctx, bundle, imgs, n_mem, mem_p, ctx.index, Clock())
        rows.append({"option": name, "denoise_cpu_s": [round(x, 3) for x in times[name]],
                     "denoise_wall_s": [round(x, 3) for x in walls[name]],
                     "speedup_vs_default": round(statistics.median(times[ref_name]) / statistics.median(times[name]), 3),
                     "max_abs_pixel_diff_vs_default": float((imgs - ref_imgs).abs().max()),
                     "mean_abs_pixel_diff_vs_default": float((imgs - ref_imgs).abs().mean()),
                     **{k: metrics[k] for k in ("mem.flagged_rate", "mem.mean_sim", "quality.kid_mean", "quality.fid")}})
        print(rows[-1], flush=True)
    result = {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "model": f"base fine-tuned as a trial: all blocks, {a.train_steps or params.train.steps} steps, seed {params.seed}",
              "n_images": len(seeds), "guidance": sample.guidance, "batch": sample.batch_size, "repeats": a.repeats,
              "compile": compile_info, "time_basis": "CPU time of the process (one torch thread)", "rows": rows, "wall_s": round(time.perf_counter() - t_start, 1)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
