"""Image paths of a user CSV stay inside the image root: a CSV that names `../other_study/x.png`, an
absolute path or a symlink out of the root would otherwise train on (and publish the memorization
of) files the user never meant to hand over. `data.csv.allow_outside_root: true` opts out."""

from __future__ import annotations

from pathlib import Path

from memcontrol.data.errors import DataError

OPT_IN = "set data.csv.allow_outside_root: true to allow it"


def image_file(raw: str, image_root: Path, where: str, *, allow_outside_root: bool = False) -> Path:
    """The file a CSV cell `raw` names (relative to `image_root`); DataError naming `where` (file
    and row) if it is absolute, climbs with `..`, or leaves the root through a symlink."""
    p = Path(raw)
    if allow_outside_root:
        return p if p.is_absolute() else image_root / p
    if p.is_absolute():
        raise DataError(f"{where}: path {raw!r} is absolute; paths must be relative to the image root "
                        f"{image_root} ({OPT_IN})")
    if ".." in p.parts:
        raise DataError(f"{where}: path {raw!r} contains '..' and may leave the image root {image_root} ({OPT_IN})")
    f = image_root / p
    root = image_root.resolve()
    if not f.resolve().is_relative_to(root):
        link = next((image_root.joinpath(*p.parts[:k]) for k in range(1, len(p.parts) + 1)
                     if image_root.joinpath(*p.parts[:k]).is_symlink()), f)
        raise DataError(f"{where}: path {raw!r} is a symlink out of the image root {image_root} "
                        f"({link} -> {link.resolve()}; {OPT_IN})")
    return f
