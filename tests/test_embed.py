"""Embedders: weights load strictly and safely, outputs have the promised shapes, known answers hold."""

from __future__ import annotations

import ast
import types
from collections import OrderedDict
from typing import List

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from memcontrol import assets
from memcontrol.embed import (
    EmbedderError,
    MobileNetV2Embedder,
    _imagenet_normalise,
    build_embedder,
    read_image,
)
from memcontrol.models.backbones import XrvDenseNet

SKIMAGE = assets.pkgdir("skimage") / "data"


@pytest.fixture(scope="module")
def mobilenet() -> MobileNetV2Embedder:
    return build_embedder("mobilenet_v2")


@pytest.fixture(scope="module")
def cxrs() -> torch.Tensor:
    """4 real chest X-rays (3 pediatric JPEGs + the adult DICOM), (4, 3, 224, 224) in [0, 1]."""
    paths = list(assets.pediatric_cxrs())[::6] + [assets.adult_cxr_dicom()]
    return torch.stack([read_image(p, 224) for p in paths])


def test_mobilenet_v2_weights_classify_real_photos(mobilenet):
    # torchvision's eval transform: resize short side to 256, centre crop 224; ImageNet ids 285 / 967
    x = torch.stack([read_image(SKIMAGE / "chelsea.png", 256), read_image(SKIMAGE / "coffee.png", 256)])
    x = x[:, :, 16:240, 16:240]
    with torch.no_grad():
        p = mobilenet.model(_imagenet_normalise(x)).softmax(-1)
    assert p.argmax(-1).tolist() == [285, 967]  # Egyptian cat, espresso
    assert p.max(-1).values.min() > 0.5


def test_mobilenet_embeddings_shape_dtype_and_unnormalised(mobilenet, cxrs):
    f = mobilenet.embed(cxrs, batch_size=3)
    assert f.shape == (4, 1280) and f.dtype == np.float32
    assert not np.allclose(np.linalg.norm(f, axis=1), 1.0)
    np.testing.assert_allclose(mobilenet.embed(cxrs, batch_size=64), f, rtol=1e-4, atol=1e-5)
    # a 1-channel image is the same as its 3-channel grey copy
    np.testing.assert_allclose(mobilenet.embed(cxrs[:, :1]), f, rtol=1e-4, atol=1e-5)


def test_mobilenet_resizes_internally(mobilenet, cxrs):
    small = F.interpolate(cxrs, size=(128, 128), mode="bilinear", antialias=True)
    f_small, f_big = mobilenet.embed(small), mobilenet.embed(cxrs)
    cos = (f_small * f_big).sum(1) / np.linalg.norm(f_small, axis=1) / np.linalg.norm(f_big, axis=1)
    assert f_small.shape == (4, 1280) and cos.min() > 0.8


def test_embed_rejects_bad_input(mobilenet):
    with pytest.raises(EmbedderError, match="must be"):
        mobilenet.embed(torch.zeros(2, 224, 224))
    with pytest.raises(EmbedderError, match="float"):
        mobilenet.embed(torch.zeros(2, 3, 224, 224, dtype=torch.uint8))


def test_pixel_embedder_is_grey_area_average(cxrs):
    e = build_embedder("pixel", grid=4)
    f = e.embed(cxrs)
    assert e.dim == 16 and f.shape == (4, 16)
    # top-left cell of a 224 px image is the mean of its 56x56 grey block
    np.testing.assert_allclose(f[:, 0], cxrs.mean(1)[:, :56, :56].mean((1, 2)).numpy(), rtol=1e-5)
    assert build_embedder("pixel").dim == 256


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_embedder_loads_archive_and_matches_module(tmp_path, cxrs):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 32)).eval()
    path = tmp_path / "copy_detector.torchscript.pt"
    torch.jit.script(net).save(str(path))
    e = build_embedder("torchscript", path=path, image_size=96)
    assert e.dim == 32
    small = F.interpolate(cxrs, size=(96, 96), mode="bilinear", antialias=True)
    with torch.no_grad():
        expected = net(_imagenet_normalise(small)).numpy()
    np.testing.assert_allclose(e.embed(cxrs), expected, rtol=1e-4, atol=1e-5)


def test_torchscript_rejects_a_state_dict(tmp_path):
    path = tmp_path / "not_script.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(EmbedderError, match="not a TorchScript archive"):
        build_embedder("torchscript", path=path)


def _xrv_densenet_class() -> type:
    """torchxrayvision's own DenseNet class, exec'd from its installed source without importing the
    package (its import pulls skimage/imageio extras that are not installed)."""
    src_path = assets.pkgdir("torchxrayvision") / "models.py"
    tree = ast.parse(src_path.read_text())
    keep = {"_DenseLayer", "_DenseBlock", "_Transition", "DenseNet"}
    mod = ast.Module(body=[n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in keep], type_ignores=[])
    ns = {
        "torch": torch, "nn": nn, "F": F, "OrderedDict": OrderedDict, "List": List, "model_urls": {},
        "datasets": types.SimpleNamespace(default_pathologies=[f"p{i}" for i in range(18)]),
    }
    exec(compile(mod, str(src_path), "exec"), ns)
    return ns["DenseNet"]


@pytest.fixture(scope="module")
def xrv_model() -> nn.Module:
    torch.manual_seed(0)
    m = _xrv_densenet_class()()
    for mod in m.modules():  # non-trivial BN statistics, so a mis-mapped buffer would show
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_xrv_densenet_matches_torchxrayvision_features(tmp_path, xrv_model, cxrs, fmt):
    sd = {k: v.contiguous() for k, v in xrv_model.state_dict().items()}
    sd["op_threshs"] = torch.rand(18)  # present in released xrv weights; ignored for embeddings
    path = tmp_path / f"densenet121-res224-mimic_ch.{fmt}"
    save_file(sd, str(path)) if fmt == "safetensors" else torch.save(sd, path)
    e = build_embedder("xrv_densenet", path=path)
    f = e.embed(cxrs[:2])
    assert e.dim == 1024 and f.shape == (2, 1024) and f.dtype == np.float32
    with torch.no_grad():  # xrv's input convention: 1 channel, [-1024, 1024]
        expected = xrv_model.features2(cxrs[:2, :1] * 2048 - 1024).numpy()
    np.testing.assert_allclose(f, expected, rtol=1e-4, atol=1e-4)


def test_xrv_densenet_has_densenet121_size():
    n = sum(p.numel() for p in XrvDenseNet().features.parameters())
    assert n == 6_953_856 - 64 * 2 * 7 * 7  # torchvision densenet121 features, 1-channel stem


def test_xrv_rejects_pickled_full_model_with_conversion_hint(tmp_path):
    path = tmp_path / "densenet121-res224-mimic_ch.pt"
    torch.save(XrvDenseNet(), path)  # a whole pickled module, as xrv releases its weights
    with pytest.raises(EmbedderError, match="(?s)refused for safety.*save_file"):
        build_embedder("xrv_densenet", path=path)


def test_xrv_rejects_foreign_state_dict(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"features.conv0.weight": torch.zeros(64, 3, 7, 7)}, str(path))
    with pytest.raises(EmbedderError, match="not an xrv DenseNet-121"):
        build_embedder("xrv_densenet", path=path)


def test_build_embedder_errors_name_the_problem(tmp_path):
    with pytest.raises(EmbedderError, match="unknown embedder kind `clip`"):
        build_embedder("clip")
    with pytest.raises(EmbedderError, match="needs `path`"):
        build_embedder("xrv_densenet")
    with pytest.raises(EmbedderError, match="does not exist"):
        build_embedder("mobilenet_v2", path=tmp_path / "missing.pth")
