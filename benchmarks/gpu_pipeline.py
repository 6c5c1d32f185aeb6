"""Our own inner loop and sampler on a GPU at Stable-Diffusion-1.5 size (random weights).

memcontrol.train.finetune (accelerate, fp16/bf16 autocast, gradient checkpointing) and
memcontrol.sample.generate (DDIM + CFG) on an SD-1.5 UNet + SD VAE built from their configs,
per method with the whole-UNet (reference-mode) mask. Prints a table, writes JSON.

    python benchmarks/gpu_pipeline.py --out benchmarks/results/gpu_pipeline.json
    python benchmarks/gpu_pipeline.py --device cpu --tiny     # smoke test here
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memcontrol import tuning  # noqa: E402
from memcontrol.models import sd15  # noqa: E402
from memcontrol.models.bundle import Bundle  # noqa: E402
from memcontrol.sample import generate  # noqa: E402
from memcontrol.train import TrainData, finetune  # noqa: E402
from memcontrol.tuning import Mask  # noqa: E402

SD15_UNET = {k: v for k, v in sd15.UNET.items() if not k.startswith("_")}
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, sample_size=512, scaling_factor=0.18215,
)
TINY_UNET = dict(SD15_UNET, sample_size=8, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, norm_num_groups=16)
TINY_VAE = dict(SD15_VAE, block_out_channels=(16, 32, 32, 32), sample_size=64, norm_num_groups=16)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--precision", default="fp16", choices=["no", "fp16", "bf16"])
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--methods", default="full,lora,difffit,svdiff,bias")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    ucfg, vcfg = (TINY_UNET, TINY_VAE) if a.tiny else (SD15_UNET, SD15_VAE)
    lat = ucfg["sample_size"]
    d = ucfg["cross_attention_dim"]
    n_img, n_prompt = 32, 16
    data = TrainData(
        latent_mean=torch.randn(n_img, 4, lat, lat), latent_std=torch.full((n_img, 4, lat, lat), 0.05),
        text=torch.randn(n_prompt, 77, d), null_text=torch.zeros(1, 77, d),
        image_idx=torch.arange(n_img).repeat(4), prompt_idx=torch.arange(n_img).repeat(4) % n_prompt,
    )
    vae = AutoencoderKL(**vcfg).to(a.device)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False)
    rows = []
    for method in a.methods.split(","):
        unet = UNet2DConditionModel(**ucfg)
        mask = Mask(method=method, blocks=(), bits=(), lr=1e-5 if method == "full" else 1e-4, mode="reference")
        prep = tuning.apply(unet, mask)
        unet.to(a.device)
        finetune(unet, prep.groups, data, sched, steps=2, batch_size=a.batch, seed=0,
                 mixed_precision=a.precision, gradient_checkpointing=a.checkpointing, device=a.device)  # warm-up
        # The peak is the timed fine-tune's own: garbage of the warm-up and of earlier methods is
        # collected first (before this, accelerate's fp16 optimizer wrapper kept each optimizer
        # alive in a reference cycle and the fp16 rows' peaks included earlier runs' AdamW state:
        # docs/performance.md "Memory").
        gc.collect()
        start = 0
        if a.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        res = finetune(unet, prep.groups, data, sched, steps=a.steps, batch_size=a.batch, seed=1,
                       mixed_precision=a.precision, gradient_checkpointing=a.checkpointing, device=a.device)
        if a.device == "cuda":
            torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t0) / a.steps * 1000
        peak = torch.cuda.max_memory_allocated() / 2**20 if a.device == "cuda" else float("nan")
        resident = start / 2**20  # UNet, VAE and whatever was still allocated when the timed run began
        bundle = Bundle(vae=vae, unet=unet.to(torch.float16 if a.precision == "fp16" and a.device == "cuda" else torch.float32),
                        text_encoder=None, tokenizer=None, scheduler=sched)
        t0 = time.perf_counter()
        imgs = generate(bundle, data.text[:4], [0, 1, 2, 3], steps=25, guidance=7.5, null_text=data.null_text)
        if a.device == "cuda":
            torch.cuda.synchronize()
        sample_s = time.perf_counter() - t0
        ok = bool(torch.isfinite(imgs).all()) and all(l == l for l in res.losses)
        rows.append({"method": method, "trainable": prep.trainable, "pct": round(prep.pct, 4), "step_ms": round(step_ms, 1),
                     "peak_train_MB": round(peak, 0), "allocated_at_start_MB": round(resident, 0), "sample_25steps_4img_s": round(sample_s, 2),
                     "loss_first": round(res.losses[0], 4), "loss_last": round(res.losses[-1], 4), "finite": ok})
        print(rows[-1], flush=True)
        del unet, bundle, prep, res
        gc.collect()
        if a.device == "cuda":
            torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"\n{dev}, {'tiny' if a.tiny else 'SD-1.5'} UNet, batch {a.batch}, {lat}x{lat} latents, {a.precision}, ckpt={a.checkpointing}")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if a.out:  # one key per precision/checkpointing setting, merged with the file's other keys
        a.out.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(a.out.read_text()) if a.out.exists() else {}
        key = f"{a.precision}{'_ckpt' if a.checkpointing else ''}"
        old[key] = {"device": dev, "precision": a.precision, "checkpointing": a.checkpointing, "batch": a.batch,
                    "latent": lat, "rows": rows, "written_by": "benchmarks/gpu_pipeline.py"}
        a.out.write_text(json.dumps(old, indent=2) + "\n")


if __name__ == "__main__":
    main()
