"""Encode a dataset once per (model, manifest): VAE latent posteriors of every image and text
states of every distinct prompt, stored as safetensors, so no trial re-encodes anything."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from memcontrol import atomic
from memcontrol.data.images import load_images
from memcontrol.models.bundle import Bundle
from memcontrol.train import TrainData

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    ids: list[str]                # manifest ids, row order of latent_*
    latent_mean: torch.Tensor     # (n, c, h, w)
    latent_std: torch.Tensor      # (n, c, h, w)
    prompts: list[str]            # distinct prompts, row order of text
    text: torch.Tensor            # (p, L, D)
    null_text: torch.Tensor       # (1, L, D)

    def image_index(self, ids) -> torch.Tensor:
        pos = {k: i for i, k in enumerate(self.ids)}
        missing = [i for i in ids if i not in pos]
        if missing:
            raise KeyError(f"ids not in the encoded set: {missing[:5]}")
        return torch.tensor([pos[i] for i in ids], dtype=torch.long)

    def prompt_index(self, prompts) -> torch.Tensor:
        pos = {k: i for i, k in enumerate(self.prompts)}
        return torch.tensor([pos[p] for p in prompts], dtype=torch.long)

    def train_data(self, rows: pd.DataFrame) -> TrainData:
        """One TrainData item per row (rows may repeat, as in the memorization-inducing set)."""
        return TrainData(
            latent_mean=self.latent_mean,
            latent_std=self.latent_std,
            text=self.text,
            null_text=self.null_text,
            image_idx=self.image_index(rows["id"].tolist()),
            prompt_idx=self.prompt_index(rows["prompt"].tolist()),
            prompts=self.prompts,
        )

    def save(self, path: Path) -> None:
        tensors = {
            "latent_mean": self.latent_mean.contiguous(),
            "latent_std": self.latent_std.contiguous(),
            "text": self.text.contiguous(),
            "null_text": self.null_text.contiguous(),
        }
        # one metadata entry: safetensors writes several in a per-process hash order, so two saves of
        # the same data differed in bytes, and the reference digest (memcontrol/reuse.py) with them
        meta = {"encoded": json.dumps({"ids": self.ids, "prompts": self.prompts}, sort_keys=True)}
        with atomic.atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> "Encoded":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        meta = json.loads(meta["encoded"]) if "encoded" in meta else {k: json.loads(meta[k]) for k in ("ids", "prompts")}
        t = load_file(str(path))
        return cls(meta["ids"], t["latent_mean"], t["latent_std"], meta["prompts"], t["text"], t["null_text"])


def image_paths(manifest: pd.DataFrame, root: Path) -> list[Path]:
    return [Path(p) if Path(p).is_absolute() else root / p for p in manifest["path"]]


def encode_manifest(bundle: Bundle, manifest: pd.DataFrame, root: Path, *, batch_size: int = 32) -> Encoded:
    """Every image of `manifest` (paths relative to `root`) and every distinct prompt."""
    lat_m, lat_s = [], []
    paths = image_paths(manifest, root)
    for i in range(0, len(paths), 256):  # bounded memory for large datasets
        x = load_images(paths[i : i + 256], bundle.resolution)
        m, s = bundle.encode_images(x, batch_size=batch_size)
        lat_m.append(m)
        lat_s.append(s)
    prompts = sorted(set(manifest["prompt"]))
    warn_truncated(bundle.tokenizer, prompts)
    return Encoded(
        ids=manifest["id"].astype(str).tolist(),
        latent_mean=torch.cat(lat_m),
        latent_std=torch.cat(lat_s),
        prompts=prompts,
        text=bundle.encode_prompts(prompts),
        null_text=bundle.encode_prompts([""]),
    )


def warn_truncated(tokenizer, prompts: list[str]) -> list[str]:
    """Prompts longer than the text encoder's positions are cut there (as Stable Diffusion does);
    say so once per dataset, since a report's findings past the cut never condition the model."""
    limit = tokenizer.model_max_length
    long = [p for p in prompts if len(tokenizer(p, truncation=False).input_ids) > limit]
    if long:
        log.warning("%d of %d distinct prompts are longer than the text encoder's %d tokens and are truncated "
                    "there, e.g. %r", len(long), len(prompts), limit, long[0][:80] + "...")
    return long
