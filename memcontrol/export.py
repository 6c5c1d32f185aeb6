"""Export a fine-tuned model for any diffusers user: a complete Stable-Diffusion-style folder with the
adapter merged into the UNet, loadable by ``StableDiffusionPipeline.from_pretrained(out)``.

* The UNet's weights are the base weights with the adapter folded in by the method's own merge
  (:func:`memcontrol.tuning.merge`): the merged UNet computes what the adapted one computed.
* The scheduler is the one every evaluation sampled with: DDIM on the base model's noise schedule
  (``clip_sample=False``; eta 0 is the pipeline's default), so ``pipe(prompt,
  num_inference_steps=sample.steps, guidance_scale=sample.guidance)`` draws what was scored.
* For LoRA, also ``pytorch_lora_weights.safetensors`` in diffusers' own format (peft's state dict
  converted by diffusers, with the LoRA config as metadata): ``load_lora_weights`` applies it to
  the *base* model (the folder's UNet already has it merged).
* ``README.md``: the model card the caller passes (memcontrol/cards.py builds it).

The folder is built under a temporary name and renamed into place: a crash leaves no half export.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from memcontrol import atomic, tuning
from memcontrol.errors import UserError
from memcontrol.models.bundle import load_bundle, write_bundle
from memcontrol.tuning.lora import ADAPTER_NAME
from memcontrol.workdir import write_json, write_text

log = logging.getLogger(__name__)

RECORD_FILE = "memcontrol_export.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
CARD_FILE = "README.md"


class ExportError(UserError, ValueError):
    """The export target or its inputs are unusable; the message names the path."""


def check_target(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier export: it may hold the user's files."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RECORD_FILE).exists())):
        raise ExportError(f"{out}: exists and is not a memcontrol export; choose a new or empty folder")


def lora_layers(unet: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The LoRA of a peft-adapted UNet in diffusers' format, and its LoraConfig as metadata."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME))
    meta = unet.peft_config[ADAPTER_NAME].to_dict()
    meta = {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}, meta


def merged_unet(base_path: Path, adapter_dir: Path) -> tuple[UNet2DConditionModel, tuning.Mask, tuple | None]:
    """A fresh base UNet with the adapter of ``adapter_dir`` merged in; its mask; and for LoRA the
    diffusers-format layers and metadata (None otherwise)."""
    if not (adapter_dir / tuning.MASK_FILE).exists():
        raise ExportError(f"{adapter_dir}: no {tuning.MASK_FILE}; not a finished fine-tune")
    adapted = UNet2DConditionModel.from_pretrained(Path(base_path) / "unet", use_safetensors=True).eval()
    mask = tuning.load_adapter(adapter_dir, adapted)
    lora = lora_layers(adapted) if mask.method == "lora" else None
    state = tuning.merge(adapted)
    plain = UNet2DConditionModel.from_pretrained(Path(base_path) / "unet", use_safetensors=True).eval()
    plain.load_state_dict(state, strict=True)  # every base parameter, nothing else
    return plain.requires_grad_(False), mask, lora


def export_model(base_path: Path | str, adapter_dir: Path | str, out: Path | str, *, card: str | None,
                 record: dict | None = None) -> Path:
    """Write the diffusers folder ``out`` for the base model at ``base_path`` fine-tuned with the
    adapter in ``adapter_dir`` (adapter.safetensors + mask.json). ``card``: README.md text;
    ``record``: extra fields for memcontrol_export.json (what was exported from where)."""
    from diffusers import StableDiffusionPipeline

    out, adapter_dir = Path(out), Path(adapter_dir)
    check_target(out)
    bundle = load_bundle(base_path)
    bundle.unet, mask, lora = merged_unet(Path(base_path), adapter_dir)
    bundle.scheduler = bundle.ddim()
    with atomic.atomic_dir(out) as staging:  # the old export is replaced only once the new one is whole
        write_bundle(bundle, staging)
        if lora is not None:
            layers, meta = lora
            StableDiffusionPipeline.save_lora_weights(staging, unet_lora_layers=layers, unet_lora_adapter_metadata=meta,
                                                      safe_serialization=True)
        if card is not None:
            write_text(card, staging / CARD_FILE)
        write_json({"method": mask.method, "mask_digest": mask.digest(), "enabled_blocks": list(mask.enabled()),
                    "lora_file": LORA_FILE if lora is not None else None, "adapter": str(adapter_dir),
                    "base_model": str(base_path), **(record or {})}, staging / RECORD_FILE)
    log.info("exported %s (%s) to %s", adapter_dir, mask.method, out)
    return out
