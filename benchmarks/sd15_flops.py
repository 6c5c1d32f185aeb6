"""FLOPs of one trial's parts, counted, on the tiny default and at Stable-Diffusion-1.5 size; an
estimate of where an SD-1.5 trial's time would go.

    python benchmarks/sd15_flops.py --workdir W [--out benchmarks/results/sd15_flops.json]

Per forward pass, counted by torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions and
attention; elementwise ops and norms are not counted): the UNet (batch 1), the VAE encoder and
decoder (one image), the text encoder (one prompt) and the MobileNetV2 embedder (one 224-px image).
SD-1.5 components are built from their published configs on the meta device (no weights, no
compute). A training step is counted as 3 forward passes of the UNet (forward + backward), the
usual estimate. Per-trial totals use the trial's settings from W/params.yaml, for our trial and the
obvious one (benchmarks/obvious_trial.py: VAE encode and text encoder per training step,
50-step pipeline sampling, reference index rebuilt per trial).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from memcontrol.config import load_params  # noqa: E402
from memcontrol.models import sd15  # noqa: E402


def count(fn) -> float:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return float(fc.get_total_flops())


def component_flops(unet, vae, text_encoder, tokens: int, device: str) -> dict:
    c = unet.config
    lat = c.sample_size
    res = lat * 2 ** (len(vae.config.block_out_channels) - 1)
    dev = torch.device(device)
    return {
        "resolution": res,
        "unet_forward": count(lambda: unet(torch.randn(1, c.in_channels, lat, lat, device=dev), torch.tensor([10], device=dev),
                                           encoder_hidden_states=torch.randn(1, tokens, c.cross_attention_dim, device=dev))),
        "vae_encode": count(lambda: vae.encode(torch.randn(1, 3, res, res, device=dev))),
        "vae_decode": count(lambda: vae.decode(torch.randn(1, vae.config.latent_channels, lat, lat, device=dev))),
        "text_encoder": count(lambda: text_encoder(torch.zeros(1, tokens, dtype=torch.long, device=dev))),
    }


def per_trial(f: dict, *, embed: float, steps: int, batch: int, gens: int, sample_steps: int, pipe_steps: int,
              n_train_images: int) -> dict:
    train = steps * batch * 3 * f["unet_forward"]
    ours = {"finetune": train, "generation": gens * sample_steps * 2 * f["unet_forward"],
            "decode": gens * f["vae_decode"], "embedding": gens * embed}
    obvious = {"finetune": train, "train_vae_encode": steps * batch * f["vae_encode"],
               "train_text_encode": steps * batch * f["text_encoder"],
               "generation": gens * pipe_steps * 2 * f["unet_forward"], "decode": gens * f["vae_decode"],
               "prompt_encode": 2 * gens * f["text_encoder"], "embedding": gens * embed,
               "index_rebuild": n_train_images * (f["vae_encode"] + f["vae_decode"] + embed)}
    out = {}
    for name, parts in (("ours", ours), ("obvious", obvious)):
        total = sum(parts.values())
        out[name] = {"pflop": {k: round(v / 1e15, 6) for k, v in parts.items()}, "total_pflop": round(total / 1e15, 6),
                     "share": {k: round(v / total, 4) for k, v in parts.items()}}
    out["ratio_obvious_over_ours"] = round(out["obvious"]["total_pflop"] / out["ours"]["total_pflop"], 3)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sd15_flops.json")
    a = ap.parse_args(argv)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from memcontrol.base_model import load_base
    from memcontrol.reference import make_quality_embedder
    from memcontrol.workdir import Layout, read_manifest, rows_of
    from sd_style import SD15_TEXT, SD15_VAE

    params = load_params(a.workdir / "params.yaml")
    layout = Layout(a.workdir)
    bundle = load_base(layout)
    emb = make_quality_embedder(params)  # the costly one; the pixel copy detector is a pooling
    embed = count(lambda: emb._forward(torch.rand(1, 3, params.metrics.embed_size, params.metrics.embed_size)))
    tiny = component_flops(bundle.unet, bundle.vae, bundle.text_encoder, bundle.tokenizer.model_max_length, "cpu")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in sd15.UNET.items() if not k.startswith("_")})
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    big = component_flops(unet, vae, text, 77, "meta")
    n_train = len(rows_of(read_manifest(layout), "train"))
    s = params.sample
    gens = len(rows_of(read_manifest(layout), "train", "mem")) * s.mem_seeds + s.n_quality
    settings = dict(embed=embed, steps=params.train.steps, batch=params.train.batch_size, gens=gens,
                    sample_steps=s.steps, pipe_steps=50, n_train_images=n_train)
    result = {
        "counted_by": "torch.utils.flop_counter.FlopCounterMode (matmul, conv, attention); training step = 3 UNet forwards",
        "embedder_forward": embed,
        "components": {"tiny_default": tiny, "sd15": big},
        "trial_settings": {k: v for k, v in settings.items() if k != "embed"},
        "per_trial": {"tiny_default": per_trial(tiny, **settings), "sd15_512px": per_trial(big, **settings)},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["per_trial"], indent=1))


if __name__ == "__main__":
    main()
