"""DSM pretraining: smoke runs on 2-D data and digits, checkpoints, resume, config validation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from ctrldiff.data.digits import load_digits
from ctrldiff.errors import CtrlDiffError
from ctrldiff.models import MLPScoreModel, load_model
from ctrldiff.models.unet import UNet
from ctrldiff.noise import make_process
from ctrldiff.train.pretrain import ClassifierConfig, PretrainConfig, augment, dsm_loss, lr_at, pretrain, train_classifier

TINY_UNET = {"channels": [8, 16], "emb_dim": 32, "groups": 4}


def test_gmm2_smoke_writes_checkpoint_and_loads(tmp_path):
    cfg = PretrainConfig(dataset="gmm2", steps=30, batch_size=64, checkpoint_every=10, log_every=10, out=str(tmp_path))
    res = pretrain(cfg, log=None)
    assert res.model_path.exists() and res.checkpoint_path.exists() and len(res.losses) == 3
    ck = torch.load(res.checkpoint_path, weights_only=False)
    assert ck["step"] == 30 and {"model", "ema", "optimizer", "config"} <= set(ck)
    m = load_model(res.model_path)
    assert isinstance(m, MLPScoreModel) and m.metadata["data_shape"] == [2] and m.metadata["steps"] == 30
    ema = {k: v for k, v in ck["ema"].items()}
    assert all(torch.equal(ema[k], v) for k, v in m.state_dict().items())  # the saved model is the EMA
    assert not list(tmp_path.glob("*.tmp"))


def test_digits_smoke_and_loss_decreases(tmp_path):
    cfg = PretrainConfig(dataset="digits", steps=40, batch_size=32, warmup_steps=5, lr=3e-3, log_every=20,
                         model=TINY_UNET, out=str(tmp_path))
    res = pretrain(cfg, log=None)
    m = load_model(res.model_path)
    assert isinstance(m, UNet) and m.num_classes == 10 and m.metadata["data_shape"] == [1, 8, 8]
    assert res.losses[-1] < 0.9  # starts at ~1 (the zero-initialised output predicts eps = 0)


def test_resume_continues_from_checkpoint(tmp_path):
    kw = dict(dataset="gmm4", batch_size=32, checkpoint_every=5, log_every=5, out=str(tmp_path))
    pretrain(PretrainConfig(steps=10, **kw), log=None)
    logs = []
    pretrain(PretrainConfig(steps=15, resume=True, **kw), log=logs.append)
    assert any("resumed" in s and "step 10" in s for s in logs)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 15


def test_config_validation():
    with pytest.raises(ValidationError):
        PretrainConfig(stepz=3)
    with pytest.raises(ValidationError):
        PretrainConfig(steps=0)
    with pytest.raises(CtrlDiffError, match="unknown data set"):
        PretrainConfig(dataset="mnist")
    with pytest.raises(CtrlDiffError, match="bad model setting"):
        pretrain(PretrainConfig(dataset="gmm2", steps=1, model={"widthh": 3}), log=None)


def test_lr_schedule():
    cfg = PretrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_dsm_loss_drops_labels():
    class Spy(torch.nn.Module):
        num_classes = 10

        def null_condition(self, c):
            return torch.full_like(c, 10)

        def forward(self, x, t, c):
            self.seen = c
            return torch.zeros_like(x)

    spy, g = Spy(), torch.Generator().manual_seed(0)
    x0 = torch.zeros(1000, 2)
    loss = dsm_loss(spy, make_process("vp"), x0, torch.zeros(1000, dtype=torch.long), 1e-3, 0.1, g)
    assert loss.item() == pytest.approx(1.0, abs=0.1)  # E||eps||^2 / d with a zero prediction
    assert 0.07 < (spy.seen == 10).float().mean() < 0.13


def test_augment_shift_and_classifier_smoke(tmp_path):
    x = load_digits("test").images[:16]
    g = torch.Generator().manual_seed(0)
    y = augment(x, 1, 0.0, g)
    assert y.shape == x.shape and not torch.equal(x, y)
    assert torch.equal(augment(x, 0, 0.0, g), x)
    res = train_classifier(ClassifierConfig(epochs=1, width=8, feature_dim=16, out=str(tmp_path)), log=None)
    assert res.model_path.exists() and 0.0 <= res.test_accuracy <= 1.0
    assert load_model(res.model_path).metadata["test_accuracy"] == res.test_accuracy
