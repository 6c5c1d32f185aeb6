"""The mask: which blocks of a UNet get a method's trainable parameters, saved as plain JSON.

A mask names its blocks (``down_blocks.1.attentions.0``, ...) instead of indexing them, so it can be
applied to another model with the same block names (the paper's transfer experiment) and read
without the code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from memcontrol import atomic
from memcontrol.errors import UserError

MODES = ("full", "reference")
GRANULARITIES = ("transformer", "resnet", "sublayer")
FORMAT_VERSION = 1
_REQUIRED = ("method", "blocks", "bits", "lr")
_OPTIONAL = ("mode", "granularity", "options", "trainable_params", "version")


class MaskError(UserError, ValueError):
    """A mask that does not fit the model or method, or a malformed mask file."""


class Options(Mapping):
    """A hashable, read-only mapping of method options (JSON scalars or lists of them)."""

    def __init__(self, data: Mapping[str, Any] | None = None):
        items = {}
        for key, value in dict(data or {}).items():
            if not isinstance(key, str):
                raise MaskError(f"mask option names must be strings, got {key!r}")
            items[key] = _freeze(key, value)
        self._items = dict(sorted(items.items()))

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self) == dict(other)

    def __repr__(self) -> str:
        return f"Options({self._items!r})"

    def to_plain(self) -> dict[str, Any]:
        """JSON-ready copy (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._items.items()}


def _freeze(key: str, value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(key, v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise MaskError(f"mask option {key!r}: value {value!r} is not a JSON scalar or list")


@dataclasses.dataclass(frozen=True)
class Mask:
    """One bit per block for one PEFT method, plus the learning rate.

    ``mode="full"``: ``blocks`` is the model's whole block list at ``granularity``
    (:func:`memcontrol.tuning.blocks.enumerate_blocks`) and the method trains only inside blocks
    whose bit is 1. ``mode="reference"``: ``blocks`` is the reference code's 13- or 16-block layout
    (:func:`memcontrol.tuning.blocks.reference_layout`) and a 0-bit freezes only what the reference
    freezes, everything else stays on; an empty block list is the unmasked whole-UNet baseline.
    docs/methods.md tabulates the difference.
    """

    method: str
    blocks: tuple[str, ...]
    bits: tuple[int, ...]
    lr: float
    mode: str = "full"
    granularity: str = "transformer"
    options: Options = dataclasses.field(default_factory=Options)
    trainable_params: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise MaskError(f"mask field `method` must be a non-empty string, got {self.method!r}")
        blocks = tuple(self.blocks)
        if not all(isinstance(b, str) and b for b in blocks):
            raise MaskError(f"mask field `blocks` must hold non-empty strings, got {list(blocks)!r}")
        dupes = sorted({b for b in blocks if blocks.count(b) > 1})
        if dupes:
            raise MaskError(f"mask field `blocks` names blocks twice: {dupes}")
        bits = tuple(self.bits)
        if len(bits) != len(blocks):
            raise MaskError(f"mask has {len(bits)} `bits` for {len(blocks)} `blocks`")
        bad = [b for b in bits if not isinstance(b, int) or b not in (0, 1)]
        if bad:
            raise MaskError(f"mask field `bits` must be 0 or 1, got {bad[:5]!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)):
            raise MaskError(f"mask field `lr` must be a number, got {self.lr!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise MaskError(f"mask field `lr` must be finite and > 0, got {self.lr!r}")
        if self.mode not in MODES:
            raise MaskError(f"mask field `mode` must be one of {MODES}, got {self.mode!r}")
        if self.granularity not in GRANULARITIES:
            raise MaskError(
                f"mask field `granularity` must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.mode == "reference" and self.granularity != "transformer":
            raise MaskError("mask `mode` 'reference' is defined on `granularity` 'transformer' only")
        n = self.trainable_params
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise MaskError(f"mask field `trainable_params` must be a count >= 0, got {n!r}")
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "bits", tuple(int(b) for b in bits))
        object.__setattr__(self, "lr", float(self.lr))
        if not isinstance(self.options, Options):
            if not isinstance(self.options, Mapping):
                raise MaskError(f"mask field `options` must be a mapping, got {self.options!r}")
            object.__setattr__(self, "options", Options(self.options))

    # -- derived masks (a mask over a model's own layout: memcontrol.tuning.blocks.mask_for_model) --
    def with_bits(self, bits) -> Mask:
        """Same blocks and settings, other bits (``trainable_params`` is cleared)."""
        return dataclasses.replace(self, bits=tuple(bits), trainable_params=None)

    # -- queries -----------------------------------------------------------------------------
    def enabled(self) -> tuple[str, ...]:
        """Names of the blocks whose bit is 1, in mask order."""
        return tuple(b for b, bit in zip(self.blocks, self.bits) if bit)

    def disabled(self) -> tuple[str, ...]:
        """Names of the blocks whose bit is 0, in mask order."""
        return tuple(b for b, bit in zip(self.blocks, self.bits) if not bit)

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": list(self.bits),
            "blocks": list(self.blocks),
            "granularity": self.granularity,
            "lr": self.lr,
            "method": self.method,
            "mode": self.mode,
            "options": self.options.to_plain(),
            "trainable_params": self.trainable_params,
            "version": FORMAT_VERSION,
        }

    def to_json(self) -> str:
        """Sorted-key, indented JSON (stable bytes for the same mask)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "mask") -> Mask:
        if not isinstance(data, Mapping):
            raise MaskError(f"{source}: expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise MaskError(f"{source}: unknown keys {unknown}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise MaskError(f"{source}: missing keys {missing}")
        version = data.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise MaskError(f"{source}: `version` {version!r} is not {FORMAT_VERSION}")
        for key in ("blocks", "bits"):
            if not isinstance(data[key], list):
                raise MaskError(f"{source}: `{key}` must be a list, got {data[key]!r}")
        if any(isinstance(b, bool) for b in data["bits"]):
            raise MaskError(f"{source}: `bits` must be 0/1 integers, not booleans")
        try:
            return cls(
                method=data["method"],
                blocks=tuple(data["blocks"]),
                bits=tuple(data["bits"]),
                lr=data["lr"],
                mode=data.get("mode", "full"),
                granularity=data.get("granularity", "transformer"),
                options=Options(data.get("options") or {}),
                trainable_params=data.get("trainable_params"),
            )
        except MaskError as err:
            raise MaskError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "mask") -> Mask:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise MaskError(f"{source}: not valid JSON ({err})") from None
        return cls.from_dict(data, source)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (temp file + rename)."""
        path = Path(path)
        atomic.write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Mask:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise MaskError(f"{path}: cannot read mask ({err})") from None
        return cls.from_json(text, source=str(path))

    def digest(self) -> str:
        """12 hex chars of the sha256 of the sorted-key JSON, ``trainable_params`` left out.

        The count is derived from the other fields, so a mask names the same trial folder and cache
        key before and after it has been counted.
        """
        d = self.to_dict()
        d.pop("trainable_params")
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:12]
