"""Per PEFT method on an SD-1.5-sized UNet (random weights from its published config) on a GPU:
trainable parameters, apply time (SV-Diff's SVDs), one training step's time and peak memory, and one
sampling pass's time. Same measurements as benchmarks/methods.py; a few minutes on one H100.

    .venv/bin/python benchmarks/sd15_gpu.py                       # CUDA, fp16 autocast, batch 2, 64x64 latents
    .venv/bin/python benchmarks/sd15_gpu.py --precision bf16 --grad-ckpt
    .venv/bin/python benchmarks/sd15_gpu.py --device cpu --tiny   # smoke test without a GPU

Writes benchmarks/results/sd15_gpu.json (or sd15_tiny_<device>.json with --tiny) after every method.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from methods import HEADER, ROOT, _format_row, add_common_args, run, tiny_config  # noqa: E402

sys.path.insert(0, str(ROOT))
from memcontrol.models import sd15  # noqa: E402

# The published SD-1.5 unet/config.json: 859,520,964 parameters.
SD15_UNET = {k: v for k, v in sd15.UNET.items() if not k.startswith("_")}


def verify(device: str, precision: str, methods) -> bool:
    """On the tiny UNet on ``device``: identity at init under autocast, then 2 AdamW steps, then
    save/load into a fresh UNet gives bit-identical predictions. Prints one line per method."""
    import tempfile

    from memcontrol.tuning import apply, load_adapter, mask_for_model, save_adapter
    from methods import _autocast

    dev = torch.device(device)
    cfg = tiny_config()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g).to(dev)
    c = torch.randn(2, 8, cfg["cross_attention_dim"], generator=g).to(dev)
    t = torch.tensor([10, 700], device=dev)

    def fresh():
        torch.manual_seed(0)
        with dev:
            return UNet2DConditionModel(**cfg)

    def predict(unet):
        with torch.no_grad(), _autocast(dev, precision):
            return unet(x, t, c).sample

    ok = True
    y0 = predict(fresh())
    for method in methods:
        unet = fresh()
        mask = mask_for_model(unet, method, 1e-3, mode="full")
        prepared = apply(unet, mask)
        identity = torch.equal(predict(unet), y0)
        opt = torch.optim.AdamW(prepared.groups)
        for _ in range(2):
            opt.zero_grad()
            with _autocast(dev, precision):
                loss = unet(x, t, c).sample.float().square().mean()
            loss.backward()
            opt.step()
        with tempfile.TemporaryDirectory() as tmp:
            save_adapter(tmp, unet, mask)
            other = fresh()
            load_adapter(tmp, other)
        roundtrip = torch.equal(predict(unet), predict(other))
        changed = not torch.equal(predict(unet), y0)
        ok &= identity and roundtrip and changed
        print(f"verify {method:<10} identity at init {identity}, trained output changed {changed}, "
              f"reload bit-identical {roundtrip}", flush=True)
    return ok


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.set_defaults(device="cuda" if torch.cuda.is_available() else "cpu", precision="fp16", tokens=77)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px images)")
    p.add_argument("--tiny", action="store_true", help="the tiny default UNet instead of SD-1.5 (smoke test)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-verify", action="store_true", help="skip the tiny-UNet correctness checks")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu" and args.precision == "fp16":
        args.precision = "bf16"  # CPU autocast runs bf16
    config = tiny_config() if args.tiny else dict(SD15_UNET, sample_size=args.latent)
    out = args.out or ROOT / "benchmarks/results" / (f"sd15_tiny_{args.device}.json" if args.tiny else "sd15_gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    if not args.no_verify:
        verified = verify(args.device, args.precision, args.methods)
        print(f"verify: {'all passed' if verified else 'FAILED'}", flush=True)

    def save(result: dict) -> None:
        out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")

    print(f"{'SD-1.5' if not args.tiny else 'tiny'} UNet on {args.device}, precision {args.precision}, "
          f"batch {args.batch}, grad ckpt {args.grad_ckpt}", flush=True)
    print(HEADER, flush=True)
    result = run(
        config, methods=args.methods, device=args.device, batch=args.batch, tokens=args.tokens,
        steps=args.steps, sample_steps=args.sample_steps, precision=args.precision,
        grad_ckpt=args.grad_ckpt, on_row=save, keep_going=True,
    )
    print(f"{result['device']}: total {result['wall_s']:.0f} s; wrote {out}", flush=True)

if __name__ == "__main__":
    main()
