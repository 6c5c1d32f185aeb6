"""The real OpenAI CLIP tokenizer (49,408 tokens), built offline from the BPE merges file that the
open_clip_torch wheel ships, identical to the `tokenizer/` folder of Stable Diffusion 1.x."""

from __future__ import annotations

import gzip
from functools import lru_cache

from transformers import CLIPTokenizer

from memcontrol import assets

VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 256 - 256 - 2  # 48,894: byte tokens, byte tokens + "</w>", 2 specials


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode character, in CLIP's (and GPT-2's) order; the order is the ids."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    path = assets.clip_bpe_vocab()
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    # Line 0 is a version header; CLIP uses exactly the next N_MERGES merges (simple_tokenizer.py).
    merges = tuple(tuple(line.split()) for line in lines[1 : 1 + N_MERGES])
    bad = [i + 2 for i, m in enumerate(merges) if len(m) != 2]
    if len(merges) != N_MERGES or bad:
        raise assets.AssetMissing(f"{path}: expected {N_MERGES} merge lines of two symbols, "
                                  f"got {len(merges)} (malformed lines {bad[:5]})")
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """SD-1.x's CLIPTokenizer: bos 49406, eos = pad = unk 49407, 77 positions.

    `"a photo of a cat"` -> [49406, 320, 1125, 539, 320, 2368, 49407], as the hub tokenizer."""
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
