"""UNet and digit classifier: shapes, save/load round trip, encoder features, CFG with every solver."""

from __future__ import annotations

import pytest
import torch

from ctrldiff.errors import CtrlDiffError
from ctrldiff.guidance import ClassifierFreeGuidance
from ctrldiff.models import load_model, save_model
from ctrldiff.models.classifier import DigitClassifier
from ctrldiff.models.unet import UNet, num_parameters
from ctrldiff.noise import make_process
from ctrldiff.solvers import SOLVERS, sample


def tiny_unet(**kw) -> UNet:
    torch.manual_seed(0)
    m = UNet(channels=(8, 16), emb_dim=32, groups=4, **kw)
    # the output conv is zero-initialised; perturb every parameter so outputs depend on the inputs
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def test_default_unet_size_and_shape():
    m = UNet()
    assert 300_000 <= num_parameters(m) <= 1_000_000
    x, t, c = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 3, 9, 10])
    assert m(x, t, c).shape == (4, 1, 8, 8)


@pytest.mark.parametrize("channels,res", [((8, 16), 8), ((8, 16, 16), 8), ((8, 16), 16)])
def test_levels_and_resolutions(channels, res):
    m = UNet(resolution=res, channels=channels, emb_dim=32, groups=4)
    feats = m.encoder_features(torch.randn(2, 1, res, res), 0.05, torch.tensor([1, 2]))
    assert len(feats) == len(channels) + 1
    for i, (f, ch) in enumerate(zip(feats, channels, strict=False)):
        assert f.shape == (2, ch, res // 2**i, res // 2**i)
    assert feats[-1].shape == (2, channels[-1], res // 2 ** (len(channels) - 1), res // 2 ** (len(channels) - 1))
    assert m.pooled_features(torch.randn(2, 1, res, res), 0.05, None).shape == (2, sum(channels) + channels[-1])


def test_output_depends_on_time_label_and_input():
    m = tiny_unet()
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 0.5)
    c = torch.tensor([1, 1, 1])
    base = m(x, t, c)
    assert not torch.allclose(base, m(x, t * 0.5, c))
    assert not torch.allclose(base, m(x, t, c + 1))
    assert not torch.allclose(base, m(x + 0.1, t, c))
    # cond None means the null token
    assert torch.allclose(m(x, t, None), m(x, t, m.null_condition(c)))


def test_bad_input_raises():
    m = tiny_unet()
    with pytest.raises(CtrlDiffError, match="expects input of shape"):
        m(torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(CtrlDiffError, match="labels must lie"):
        m(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 11]))
    with pytest.raises(CtrlDiffError, match="levels"):
        UNet(channels=(8, 16, 16, 16))


def test_save_load_round_trip(tmp_path):
    m = tiny_unet()
    save_model(m, tmp_path / "unet", metadata={"note": "x"})
    m2 = load_model(tmp_path / "unet.safetensors")
    assert isinstance(m2, UNet) and m2.metadata == {"note": "x"}
    x, t, c = torch.randn(5, 1, 8, 8), torch.rand(5), torch.arange(5)
    with torch.no_grad():
        assert torch.equal(m(x, t, c), m2(x, t, c))


def test_load_rejects_wrong_weights(tmp_path):
    save_model(tiny_unet(), tmp_path / "a")
    (tmp_path / "a.json").write_text((tmp_path / "a.json").read_text().replace('"emb_dim": 32', '"emb_dim": 64'))
    with pytest.raises(CtrlDiffError, match="do not fit"):
        load_model(tmp_path / "a")


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_cfg_with_every_solver(solver):
    m = tiny_unet()
    cfg = ClassifierFreeGuidance(m, 2.5)
    p = make_process("vp")
    c = torch.tensor([0, 1, 2, 3])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tr = sample(cfg, p, (4, 1, 8, 8), 4, solver, cond=c, generator=g)
    assert tr.final.shape == (4, 1, 8, 8) and torch.isfinite(tr.states).all()
    # the guided output is u + s (c - u), evaluated in one batched call
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 0.3)
    with torch.no_grad():
        u, cc = m(x, t, m.null_condition(c)), m(x, t, c)
        assert torch.allclose(cfg(x, t, c), u + 2.5 * (cc - u), atol=1e-5)


def test_classifier_shapes_and_round_trip(tmp_path):
    torch.manual_seed(0)
    clf = DigitClassifier(width=8, feature_dim=16).eval()
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    assert clf(x).shape == (6, 10) and clf.features(x).shape == (6, 16)
    assert clf.predict(x).shape == (6,)
    assert clf(torch.rand(2, 1, 16, 16)).shape == (2, 10)  # other resolutions are resized
    save_model(clf, tmp_path / "clf")
    clf2 = load_model(tmp_path / "clf")
    with torch.no_grad():
        assert torch.equal(clf(x), clf2(x))
    with pytest.raises(CtrlDiffError, match="expects images"):
        clf(torch.rand(2, 3, 8, 8))
