"""Our trial against the obvious one, in the same process, alternating, with the same masks, seeds
and training recipe, on one torch thread.

    python benchmarks/obvious_trial.py --workdir W [--steps 160] [--out benchmarks/results/obvious_trial.json]

**Obvious** (as diffusers' `train_text_to_image(_lora).py` and `StableDiffusionPipeline` do it):
every training step reads its batch of images from disk, encodes them with the VAE
(`latent_dist.sample()`) and tokenises and encodes its captions with the text encoder; the
generations are `StableDiffusionPipeline(...)(prompts, generator=[...], guidance_scale=g)` with
its default step count (50) and SD-1.5's published default scheduler (PNDM, `skip_prk_steps`)
in batches of sample.batch_size prompts; the reference index is rebuilt per trial (training
images read, put through the VAE as metrics.reference_space says, embedded, FAISS index built).

**Ours**: memcontrol.arms.run_arm (cached latents and text states, the reference index loaded
once, batched classifier-free guidance, DDIM at sample.steps).

Everything else is the same in both: the base model, the mask and its LR, the AdamW recipe
(steps, batch, caption dropout, grad clip), the prompts and seeds of the generations, the
threshold and held-out features, and the scoring code. Also: generation alone, our `generate` vs
`StableDiffusionPipeline` with the same DDIM scheduler, steps, guidance, prompts and seeds, timed
alternately and compared pixel by pixel.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from diffusers import PNDMScheduler, StableDiffusionPipeline  # noqa: E402

from memcontrol import tuning  # noqa: E402
from memcontrol.arms import run_arm, search_rows  # noqa: E402
from memcontrol.base_model import block_list, load_base  # noqa: E402
from memcontrol.config import load_params  # noqa: E402
from memcontrol.data.images import load_images  # noqa: E402
from memcontrol.encode import image_paths  # noqa: E402
from memcontrol.memorization import nn_scores, noise_norm  # noqa: E402
from memcontrol.quality import fid_kid  # noqa: E402
from memcontrol.reference_index import ReferenceIndex  # noqa: E402
from memcontrol.sample import generate, item_seed  # noqa: E402
from memcontrol.tuning import Mask  # noqa: E402
from memcontrol.workdir import Layout  # noqa: E402
from trial_profile import Clock, cpu_timed, eval_inputs, setup  # noqa: E402


def masks(params, layout) -> dict[str, Mask]:
    """Three masks the search could propose, far enough apart to rank: all blocks, every other
    block, one block (search.learning_rates' middle LR)."""
    blocks = block_list(params, layout)
    lr = float(params.search.learning_rates[len(params.search.learning_rates) // 2])
    n = len(blocks)
    make = lambda bits: Mask(method=params.tuning.method, blocks=blocks, bits=tuple(bits), lr=lr,  # noqa: E731
                             mode=params.tuning.mode, granularity=params.tuning.granularity,
                             options=dict(params.tuning.options))
    return {"all_blocks": make([1] * n), "every_other": make([i % 2 for i in range(n)]),
            "one_block": make([1] + [0] * (n - 1))}


def pipeline(bundle, scheduler) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
                                   unet=bundle.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def pipe_generate(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float, batch: int) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        r = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                 output_type="pt")
        out.append(r.images.float())
    return torch.cat(out)


def obvious_trial(params, layout, ctx, mask: Mask, rows, *, seed: int, steps: int, pipe_steps: int) -> tuple[dict, dict]:
    clock = Clock()
    t_all, c_all = time.perf_counter(), time.process_time()
    root = layout.manifest.parent
    with clock.part("data_loading"):
        bundle = load_base(layout)
        torch.manual_seed(seed)
        prepared = tuning.apply(bundle.unet, mask)
    unet, vae, text_encoder, tok = bundle.unet, bundle.vae, bundle.text_encoder, bundle.tokenizer
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in prepared.groups],
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=params.train.weight_decay)
    sched = bundle.scheduler
    alphas = sched.alphas_cumprod
    gen = torch.Generator().manual_seed(seed)
    paths = image_paths(rows.reset_index(drop=True), root)
    prompts = rows["prompt"].tolist()
    n, bs = len(rows), params.train.batch_size
    order, pos = torch.randperm(n, generator=gen), 0
    params_list = [p for g in prepared.groups for p in g["params"]]
    unet.train()
    for _ in range(steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        items = order[pos:pos + min(bs, n)].tolist()
        pos += len(items)
        with clock.part("train_read_images"):
            pixels = load_images([paths[i] for i in items], bundle.resolution)
        caps = ["" if torch.rand(1, generator=gen).item() < params.train.cfg_dropout else prompts[i] for i in items]
        with clock.part("train_vae_encode"):
            z0 = vae.encode(pixels).latent_dist.sample(generator=gen) * bundle.latent_scale
            # contiguous: the VAE returns channels_last latents, and torch 2.13's CPU GroupNorm backward
            # segfaults on them (as memcontrol.models.bundle.encode_images notes)
            z0 = z0.contiguous()
        with clock.part("train_text_encode"):
            enc = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt")
            use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))  # as the pipeline does
            text = text_encoder(enc.input_ids, attention_mask=enc.attention_mask if use_mask else None)[0]
        with clock.part("finetune"):
            noise = torch.randn(z0.shape, generator=gen)
            t = torch.randint(0, sched.config.num_train_timesteps, (len(items),), generator=gen)
            zt = sched.add_noise(z0, noise, t)
            loss = F.mse_loss(unet(zt, t, encoder_hidden_states=text).sample.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params_list, params.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    unet.eval()
    del opt
    with clock.part("index_rebuild"):
        train_rows = ctx.df.set_index("id").loc[ctx.ids["train"]].reset_index()
        chunks = []
        for i in range(0, len(train_rows), 256):
            x = load_images(image_paths(train_rows.iloc[i:i + 256], root), bundle.resolution)
            x01 = bundle.decode(bundle.encode_images(x)[0]) if params.metrics.reference_space == "decoded" else (x + 1) / 2
            chunks.append(ctx.embedder.embed(x01))
        train_f = np.concatenate(chunks)
        index = ReferenceIndex.build(train_f, kind=params.metrics.index, center=params.metrics.center)
    sample = params.sample
    mem, qual = ctx.mem_rows, ctx.quality_rows
    gen_prompts = [p for p in mem["prompt"] for _ in range(sample.mem_seeds)] + qual["prompt"].tolist()
    _, seeds, mem_p, n_mem = eval_inputs(ctx)
    with clock.part("generation_pipeline"):
        pipe = pipeline(bundle, PNDMScheduler.from_config(bundle.scheduler.config, skip_prk_steps=True))
        pipe.set_progress_bar_config(disable=True)
        imgs = pipe_generate(pipe, gen_prompts, seeds, steps=pipe_steps, guidance=sample.guidance,
                             batch=sample.batch_size)
    metrics = score(params, ctx, bundle, imgs, n_mem, mem_p, index, clock)
    clock.s["total"] = time.perf_counter() - t_all
    clock.cpu["total"] = time.process_time() - c_all
    return {"wall": clock.s, "cpu": clock.cpu}, metrics


def score(params, ctx, bundle, imgs, n_mem, mem_p, index, clock) -> dict:
    sample, enc = params.sample, ctx.encoded
    with clock.part("embedding"):
        mem_f, qual_f = ctx.embedder.embed(imgs[:n_mem]), ctx.quality_embedder.embed(imgs[n_mem:])
    with clock.part("faiss_search"):
        sims = index.search(mem_f, k=1)[0][:, 0]
    scores = nn_scores(sims, ctx.threshold["threshold"])
    with clock.part("kid_fid"):
        pos = {k: i for i, k in enumerate(ctx.ids[ctx.split])}
        real_f = ctx.heldout_feats[[pos[i] for i in ctx.quality_rows["id"]]]
        quality = fid_kid(real_f, qual_f, kid_subset_size=min(params.metrics.kid_subset_size, len(real_f)), seed=params.seed)
    with clock.part("noise_norm"):
        img_idx = enc.image_index(ctx.mem_rows["id"].tolist())
        noise = noise_norm(bundle.unet, enc.latent_mean[img_idx], enc.text[mem_p], enc.null_text, bundle.scheduler,
                           seed=sample.seed)
    return {"mem.flagged_rate": scores.flagged_rate, "mem.mean_sim": scores.mean_sim,
            "quality.kid_mean": float(quality["kid_mean"]), "quality.fid": float(quality["fid"]),
            "noise_norm.mean": float(noise["mean"])}


def generation_only(params, layout, ctx, *, repeats: int) -> dict:
    """Our generate() vs StableDiffusionPipeline, both with DDIM at sample.steps and sample.guidance,
    on the trial's prompts and seeds, on the base model; alternating; max pixel difference."""
    from diffusers import DDIMScheduler

    bundle = load_base(layout)
    sample = params.sample
    text, seeds, _, n_mem = eval_inputs(ctx)
    mem, qual = ctx.mem_rows, ctx.quality_rows
    prompts = [p for p in mem["prompt"] for _ in range(sample.mem_seeds)] + qual["prompt"].tolist()
    pipe = pipeline(bundle, DDIMScheduler.from_config(bundle.scheduler.config, clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    ours_s, theirs_s, ours_c, theirs_c = [], [], [], []
    for _ in range(repeats):
        a, w, c = cpu_timed(lambda: generate(bundle, text, seeds, steps=sample.steps, guidance=sample.guidance,
                                             batch_size=sample.batch_size, null_text=ctx.encoded.null_text))
        ours_s.append(w)
        ours_c.append(c)
        b, w, c = cpu_timed(lambda: pipe_generate(pipe, prompts, seeds, steps=sample.steps, guidance=sample.guidance,
                                                  batch=sample.batch_size))
        theirs_s.append(w)
        theirs_c.append(c)
    diff = (a - b).abs()
    return {"n_images": len(seeds), "steps": sample.steps, "guidance": sample.guidance, "scheduler": "DDIM eta 0",
            "ours_s": [round(x, 3) for x in ours_s], "pipeline_s": [round(x, 3) for x in theirs_s],
            "ours_cpu_s": [round(x, 3) for x in ours_c], "pipeline_cpu_s": [round(x, 3) for x in theirs_c],
            "ratio_pipeline_over_ours": round(statistics.median(theirs_c) / statistics.median(ours_c), 3),
            "ratio_basis": "CPU time of the process (one torch thread)",
            "max_abs_pixel_diff": float(diff.max()), "mean_abs_pixel_diff": float(diff.mean()),
            "pixel_scale": "[0, 1]"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=None, help="training steps of both arms (default train.steps)")
    ap.add_argument("--pipe-steps", type=int, default=50, help="StableDiffusionPipeline's default")
    ap.add_argument("--masks", default="all_blocks,every_other,one_block")
    ap.add_argument("--seeds", default="0", help="training seeds of our arm (the first is also the obvious arm's)")
    ap.add_argument("--gen-repeats", type=int, default=2, help="0: skip the generation-only comparison")
    ap.add_argument("--append", action="store_true", help="keep the masks already in --out")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/obvious_trial.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    params, layout = load_params(a.workdir / "params.yaml"), Layout(a.workdir)
    ctx, _ = setup(params, layout)
    rows = search_rows(params, ctx)
    steps = a.steps or params.train.steps
    seeds = [int(s) for s in a.seeds.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="obvious_"))
    result = {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "train_steps": steps, "train_batch": params.train.batch_size, "pipe_steps": a.pipe_steps,
              "pipe_scheduler": "PNDM (skip_prk_steps), SD-1.5's default", "ours_sampler": f"DDIM {params.sample.steps}",
              "guidance": params.sample.guidance, "n_generations": len(eval_inputs(ctx)[1]),
              "index_size": len(ctx.ids["train"]), "ratio_basis": "CPU time of the process (one torch thread)",
              "masks": {}}
    if a.append and a.out.exists():  # masks measured by earlier runs (one run per mask keeps each run short)
        old = json.loads(a.out.read_text())
        result["masks"] = old.get("masks", {})
        result["generation_only"] = old.get("generation_only")
        result["wall_s_earlier_runs"] = old.get("wall_s", 0) + old.get("wall_s_earlier_runs", 0)
    if a.gen_repeats:
        result["generation_only"] = generation_only(params, layout, ctx, repeats=a.gen_repeats)
        print("generation only:", result["generation_only"], flush=True)
    all_masks = masks(params, layout)
    for name in a.masks.split(","):
        mask = all_masks[name]
        parts, obvious = obvious_trial(params, layout, ctx, mask, rows, seed=seeds[0], steps=steps, pipe_steps=a.pipe_steps)
        ours = []
        for s in seeds:
            rec, wall, cpu = cpu_timed(lambda: run_arm(params, layout, ctx, mask, tmp / f"{name}-{s}", rows=rows,
                                                       steps=steps, seed=s))
            ours.append({"seed": s, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                         "metrics": {k: rec["metrics"][k] for k in obvious}})
        result["masks"][name] = {
            "enabled_blocks": int(sum(mask.bits)), "lr": mask.lr,
            "obvious": {"parts_s": {k: round(v, 3) for k, v in parts["wall"].items()},
                        "parts_cpu_s": {k: round(v, 3) for k, v in parts["cpu"].items()}, "metrics": obvious},
            "ours": ours,
            "ratio_obvious_over_ours": round(parts["cpu"]["total"] / ours[0]["cpu_s"], 3),
            "ratio_obvious_over_ours_wall": round(parts["wall"]["total"] / ours[0]["wall_s"], 3),
        }
        print(name, json.dumps(result["masks"][name]), flush=True)
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    names = list(result["masks"])
    for arm in ("obvious", "ours"):
        for key in ("mem.mean_sim", "mem.flagged_rate", "quality.kid_mean"):
            val = {m: (result["masks"][m][arm]["metrics"] if arm == "obvious" else result["masks"][m][arm][0]["metrics"])[key]
                   for m in names}
            result.setdefault("ranking", {}).setdefault(key, {})[arm] = sorted(names, key=lambda m: -val[m])
    ratios = [result["masks"][m]["ratio_obvious_over_ours"] for m in names]
    result["ratio_median"] = statistics.median(ratios)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ranking"], indent=1), "ratio", result["ratio_median"])


if __name__ == "__main__":
    main()
