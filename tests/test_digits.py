"""The digits data (split, scaling, image helpers) and the shipped digits assets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ctrldiff import assets
from ctrldiff.data.digits import load_digits, make_grid, save_grid, split_indices, to_native, to_pixels, to_uint8, upsample
from ctrldiff.errors import CtrlDiffError
from ctrldiff.models.classifier import accuracy, conditional_sample_accuracy


def test_shapes_ranges_and_split():
    tr, te, al = load_digits("train"), load_digits("test"), load_digits("all")
    assert tr.images.shape == (1497, 1, 8, 8) and te.images.shape == (300, 1, 8, 8) and len(al) == 1797
    assert tr.labels.dtype == torch.long and tr.images.dtype == torch.float32
    assert tr.images.min() == -1.0 and tr.images.max() == 1.0
    # pixel values 0..16 map to the 17 levels v/8 - 1
    levels = torch.unique(al.images)
    assert torch.allclose(levels, torch.arange(17) / 8.0 - 1.0)
    a, b = split_indices()
    assert len(set(a.tolist()) & set(b.tolist())) == 0 and len(a) + len(b) == 1797
    # stratified: every class has 29..31 held-out images
    assert te.labels.bincount(minlength=10).min() >= 29
    # fixed: the same split every call
    assert torch.equal(load_digits("test").labels, te.labels)


def test_resolution_16_and_back():
    x16 = load_digits("test", resolution=16).images
    assert x16.shape == (300, 1, 16, 16) and x16.min() >= -1.0 and x16.max() <= 1.0
    x8 = load_digits("test").images
    assert (to_native(x16) - x8).abs().mean() < 0.15
    assert torch.equal(upsample(x8, 8), x8)


def test_bad_arguments():
    with pytest.raises(CtrlDiffError, match="split"):
        load_digits("valid")
    with pytest.raises(CtrlDiffError, match="resolution"):
        load_digits("train", resolution=12)


def test_image_helpers(tmp_path):
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).reshape(5, 1, 1, 1).expand(5, 1, 8, 8)
    u = to_uint8(x)
    assert u.dtype == torch.uint8 and u[:, 0, 0, 0].tolist() == [0, 0, 128, 255, 255]
    assert to_pixels(x)[:, 0, 0, 0].tolist() == [0.0, 0.0, 8.0, 16.0, 16.0]
    g = make_grid(x, nrow=3, pad=1, upscale=2)
    assert g.shape == (2 * (2 * 9 + 1), 2 * (3 * 9 + 1))
    p = save_grid(x, tmp_path / "g.png")
    from PIL import Image

    assert np.asarray(Image.open(p)).shape == tuple(make_grid(x).shape)


# ---- shipped assets ---------------------------------------------------------------------------
def test_manifest_hashes_match():
    doc = json.loads(assets.MANIFEST.read_text())
    names = {rec["name"] for a in doc["assets"].values() for rec in a["files"]}
    assert {"digits_unet.safetensors", "digits_unet.json", "digit_classifier.safetensors",
            "digit_classifier.json"} <= names
    checked = assets.verify_manifest()
    assert set(checked) == names
    for a in doc["assets"].values():
        assert a["command"].startswith("ctrldiff ") and a["train_time_s"] > 0
        assert sum(r["size"] for r in a["files"]) < 5_000_000


def test_verify_detects_a_changed_file(tmp_path):
    doc = assets.read_manifest()
    for a in doc["assets"].values():
        for rec in a["files"]:
            (tmp_path / rec["name"]).write_bytes((assets.ASSETS_DIR / rec["name"]).read_bytes())
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    assert assets.verify_manifest(tmp_path / "manifest.json")
    f = tmp_path / "digit_classifier.json"
    f.write_text(f.read_text().replace('"epochs"', '"epochz"'))
    with pytest.raises(CtrlDiffError, match="digit_classifier.json"):
        assets.verify_manifest(tmp_path / "manifest.json")


def test_shipped_classifier_held_out_accuracy():
    clf = assets.load_digit_classifier()
    te = load_digits("test")
    assert accuracy(clf, te.images, te.labels) >= 0.95
    assert clf.features(te.images[:4]).shape == (4, clf.feature_dim)


def test_shipped_model_conditional_samples():
    model = assets.load_digits_model()
    assert model.num_classes == 10 and model.metadata["process"]["name"] == "vp"
    acc = conditional_sample_accuracy(model, assets.load_digit_classifier(), per_class=20,
                                      guidance=assets.DEFAULT_GUIDANCE, solver="ddim", steps=25, seed=1)
    assert acc >= 0.85
