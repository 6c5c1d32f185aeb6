"""Training-time memorization mitigations that stack on any mask (docs/paper.md §5).

Each mitigation plugs into one hook of :func:`memcontrol.train.finetune` or into the rows it trains on:

- :class:`RandomWordAddition` (RWA, Somepalli et al. 2023b): ``k`` random vocabulary words inserted
  at random word positions of the caption, **drawn again every time a caption is used** (the
  reference draws them once, when the dataset is built: docs/paper.md §5). Text states are cached per
  distinct prompt, so the augmented captions are encoded on the fly with the frozen text encoder
  (docs/results.md, "Mitigations", says why not a pool of pre-encoded variants).
- :class:`GaussianTextNoise` (GN, Somepalli et al. 2023b): i.i.d. Gaussian noise on the text states.
- :class:`WenFilter` (Wen et al. ICLR'24): per sample ``g = ||eps(z_t, t, c) - eps(z_t, t, "")||_2`` with
  the very ``z_t, t`` of the training loss; samples with ``g >= tau`` (a fixed float) or ``g >=`` the
  batch's ``quantile`` (``"auto"``, 0.9 as the reference) get weight 0.
- :func:`deduplicate`: the training rows with repeated images collapsed to one row each.

An arm name such as ``"selected+rwa+wen"`` is a base (``full``, ``selected``, ``unmasked`` or a PEFT
method) followed by mitigations; :func:`parse_arm` splits it, :func:`train_hooks` builds the hooks.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from memcontrol.errors import UserError

log = logging.getLogger(__name__)

MITIGATIONS = ("rwa", "gn", "wen", "dedup")
TEXT_SIDE = ("rwa", "gn")  # applied in this order when stacked

# A batch text transform, as memcontrol.train.finetune calls it:
# (text states (b, L, D) float32, prompt indices (b,) int64, generator) -> text states (b, L, D).
TextTransform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


class MitigationError(UserError, ValueError):
    """An unknown mitigation or arm name, or invalid mitigation settings."""


# ----------------------------------------------------------------------------- arm names


def parse_arm(name: str) -> tuple[str, tuple[str, ...]]:
    """``"selected+rwa+wen"`` -> ``("selected", ("rwa", "wen"))``.

    The base is checked only for being non-empty (which bases exist depends on the run); each
    mitigation must be one of :data:`MITIGATIONS`, at most once.
    """
    parts = [s.strip() for s in str(name).split("+")]
    base, mits = parts[0], tuple(parts[1:])
    if not base or base in MITIGATIONS:
        raise MitigationError(f"arm {name!r}: must start with a base (full, selected, unmasked or a method), "
                              f"then `+mitigation`s; got base {base!r}")
    unknown = [m for m in mits if m not in MITIGATIONS]
    if unknown:
        raise MitigationError(f"arm {name!r}: unknown mitigation(s) {unknown}; known: {list(MITIGATIONS)}")
    if len(set(mits)) != len(mits):
        raise MitigationError(f"arm {name!r}: a mitigation is listed twice")
    return base, mits


# ----------------------------------------------------------------------------- RWA


def vocabulary_words(tokenizer, *, min_len: int = 3) -> list[str]:
    """Whole lower-case alphabetic words of a tokenizer's vocabulary, sorted (deterministic).

    WordPiece (BERT/MiniLM) continuation pieces ``##x`` and special tokens are left out; CLIP BPE
    word-final tokens ``word</w>`` lose their marker. The reference draws any CLIP token id < 49,400,
    punctuation and sub-words included; whole words keep the inserted text readable and make every
    insertion a real extra word."""
    words = set()
    pat = re.compile(rf"[a-z]{{{min_len},}}")
    for tok in tokenizer.get_vocab():
        w = tok[: -len("</w>")] if tok.endswith("</w>") else tok
        if pat.fullmatch(w):
            words.add(w)
    if not words:
        raise MitigationError(f"tokenizer {type(tokenizer).__name__}: no whole alphabetic words of >= {min_len} letters")
    return sorted(words)


def add_random_words(caption: str, words: Sequence[str], k: int, generator: torch.Generator) -> str:
    """Insert ``k`` words drawn uniformly (with replacement) from ``words``, each at a uniform random
    word position (0 .. current length) of ``caption``. Deterministic given the generator state."""
    out = caption.split()
    picks = torch.randint(len(words), (k,), generator=generator).tolist()
    for w in picks:
        pos = int(torch.randint(len(out) + 1, (1,), generator=generator))
        out.insert(pos, words[w])
    return " ".join(out)


@dataclass
class RandomWordAddition:
    """RWA as a text transform that re-samples the added words at every use of a caption.

    ``prompts``: the strings behind the prompt indices (``TrainData.prompts``); ``encode``: prompts ->
    text states (n, L, D) float32 with the frozen text encoder (``Bundle.encode_prompts``)."""

    prompts: Sequence[str]
    words: Sequence[str]
    encode: Callable[[list[str]], torch.Tensor]
    k: int = 4
    calls: int = field(default=0, init=False)
    examples: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise MitigationError(f"RWA: k must be >= 1, got {self.k}")
        if not self.words:
            raise MitigationError("RWA: the word list is empty")

    def __call__(self, text: torch.Tensor, pidx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        captions = [add_random_words(self.prompts[int(i)], self.words, self.k, gen) for i in pidx]
        if len(self.examples) < 4:
            self.examples.append(captions[0])
        self.calls += 1
        out = self.encode(captions)
        if out.shape != text.shape:
            raise MitigationError(f"RWA: encoder returned {tuple(out.shape)}, the cached states are {tuple(text.shape)}")
        return out.to(text.dtype)


# ----------------------------------------------------------------------------- GN


@dataclass
class GaussianTextNoise:
    """``text + sigma * N(0, I)`` on every token state, fresh noise at every use (absolute sigma: the
    MiniLM token states of the embedded default have std 0.35, SD-1.5's CLIP states about 1)."""

    sigma: float

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise MitigationError(f"GN: sigma must be > 0, got {self.sigma}")

    def __call__(self, text: torch.Tensor, pidx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return text + self.sigma * torch.randn(text.shape, generator=gen).to(text.dtype)


@dataclass
class Compose:
    """Text transforms applied left to right (RWA re-encodes, so it must come before GN)."""

    transforms: tuple

    def __call__(self, text: torch.Tensor, pidx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        for t in self.transforms:
            text = t(text, pidx, gen)
        return text


# ----------------------------------------------------------------------------- Wen et al. filter


@dataclass
class WenFilter:
    """Wen et al.'s training-time mitigation as a ``finetune`` loss filter (docs/paper.md §5).

    ``threshold``: a float tau (drop ``g >= tau``) or ``"auto"`` (drop ``g >=`` the batch's
    ``quantile`` of g). ``g`` is computed without gradients, on the caption the loss uses (after CFG
    dropout, so a dropped caption has g = 0 and is kept, as in the reference). Counts are kept in
    ``seen``/``dropped``; ``g_sum`` gives the mean g over all samples."""

    threshold: float | str = "auto"
    quantile: float = 0.9
    seen: int = field(default=0, init=False)
    dropped: int = field(default=0, init=False)
    g_sum: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.threshold, str) and self.threshold != "auto":
            raise MitigationError(f"Wen filter: threshold must be a number or 'auto', got {self.threshold!r}")
        if not 0.0 < self.quantile < 1.0:
            raise MitigationError(f"Wen filter: quantile must be in (0, 1), got {self.quantile}")

    @torch.no_grad()
    def magnitudes(self, unet, zt: torch.Tensor, t: torch.Tensor, text: torch.Tensor, null_text: torch.Tensor) -> torch.Tensor:
        """zt (b, c, h, w), t (b,), text (b, L, D), null_text (1, L, D) -> g (b,) float32."""
        e_c = unet(zt, t, encoder_hidden_states=text).sample
        e_u = unet(zt, t, encoder_hidden_states=null_text.expand(len(zt), -1, -1).to(text.dtype)).sample
        return (e_c.float() - e_u.float()).flatten(1).norm(dim=1)

    def __call__(self, *, unet, zt, t, text, null_text, per_sample) -> torch.Tensor:
        g = self.magnitudes(unet, zt, t, text, null_text)
        tau = torch.quantile(g, self.quantile) if self.threshold == "auto" else torch.tensor(float(self.threshold))
        keep = (g < tau.to(g.device)).to(per_sample.dtype)
        self.seen += len(g)
        self.dropped += int((keep == 0).sum())
        self.g_sum += float(g.sum())
        return keep

    def stats(self) -> dict[str, float]:
        return {"wen.seen": self.seen, "wen.dropped": self.dropped,
                "wen.dropped_rate": self.dropped / self.seen if self.seen else 0.0,
                "wen.mean_g": self.g_sum / self.seen if self.seen else float("nan")}


# ----------------------------------------------------------------------------- dedup


def deduplicate(rows: pd.DataFrame) -> pd.DataFrame:
    """Training rows with every repeated image kept once (first occurrence, order kept).

    A repeat is the same manifest ``id`` or, for distinct ids, the same image bytes (``sha256``)."""
    missing = [c for c in ("id", "sha256") if c not in rows.columns]
    if missing:
        raise MitigationError(f"deduplicate: rows lack column(s) {missing}")
    out = rows.drop_duplicates(subset="id").drop_duplicates(subset="sha256")
    log.info("deduplicate: %d rows -> %d", len(rows), len(out))
    return out.reset_index(drop=True)


# ----------------------------------------------------------------------------- assembling an arm


@dataclass(frozen=True)
class Settings:
    """The mitigation settings an arm's hooks are built from (params.yaml `audit.mitigations`)."""

    rwa_k: int = 4
    gn_sigma: float = 0.1
    wen_threshold: float | str = "auto"
    wen_quantile: float = 0.9


def train_hooks(
    mitigations: Sequence[str],
    settings: Settings,
    *,
    prompts: Sequence[str] = (),
    encode: Callable[[list[str]], torch.Tensor] | None = None,
    words: Sequence[str] = (),
) -> dict:
    """``finetune`` keyword hooks for the given mitigations: ``text_transform`` (RWA then GN, when
    present) and ``loss_filter`` (Wen). ``dedup`` acts on the rows (:func:`deduplicate`), not here.
    RWA needs ``prompts``, ``encode`` and ``words``."""
    unknown = [m for m in mitigations if m not in MITIGATIONS]
    if unknown:
        raise MitigationError(f"unknown mitigation(s) {unknown}; known: {list(MITIGATIONS)}")
    hooks: dict = {}
    text = []
    if "rwa" in mitigations:
        if encode is None or not prompts or not words:
            raise MitigationError("RWA needs the prompts, a text encoder and a word list")
        text.append(RandomWordAddition(prompts, words, encode, k=settings.rwa_k))
    if "gn" in mitigations:
        text.append(GaussianTextNoise(settings.gn_sigma))
    if text:
        hooks["text_transform"] = text[0] if len(text) == 1 else Compose(tuple(text))
    if "wen" in mitigations:
        hooks["loss_filter"] = WenFilter(settings.wen_threshold, settings.wen_quantile)
    return hooks


def hook_stats(hooks: dict) -> dict:
    """Counters a run of the hooks left behind (Wen: seen/dropped; RWA: calls + example captions)."""
    out: dict = {}
    f = hooks.get("loss_filter")
    if isinstance(f, WenFilter):
        out.update(f.stats())
    t = hooks.get("text_transform")
    for x in t.transforms if isinstance(t, Compose) else (t,):
        if isinstance(x, RandomWordAddition):
            out["rwa.calls"] = x.calls
            out["rwa.examples"] = list(x.examples)
    return out
