"""Rectified-flow (flow-matching) models: the velocity parameterisation, the exact rectified-flow 2-D yardstick
'<preset>-rf-exact', the shipped 'digits-rf' model, and every algorithm running on them."""

import math

import pytest
import torch

from ctrldiff.data.toy2d import gmm_preset, parse_exact_spec
from ctrldiff.errors import CtrlDiffError
from ctrldiff.models.mlp import ExactGMMScore
from ctrldiff.noise import RectifiedFlow, make_process
from ctrldiff.solvers import evaluate_along, kl_path, sample
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.task import build_task
from ctrldiff.train.trainer import Trainer

RF = make_process("rf")


def test_velocity_conversions_are_the_flow_matching_ones():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    t = torch.rand(64, generator=g) * 0.98 + 0.01
    x, _ = RF.marginal(x0, t, eps)
    v = RF.velocity(x0, eps, t)
    torch.testing.assert_close(v, eps - x0)
    tt = t[:, None]
    torch.testing.assert_close(RF.convert(v, "v", "eps", t, x), x + (1 - tt) * v)  # eps_hat = x + (1 - t) v
    torch.testing.assert_close(RF.convert(v, "v", "x0", t, x), x - tt * v, atol=1e-5, rtol=1e-5)  # x0_hat = x - t v
    torch.testing.assert_close(RF.convert(v, "v", "score", t, x), -(x + (1 - tt) * v) / tt, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(RF.convert(eps, "eps", "v", t, x), v, atol=1e-4, rtol=1e-5)
    # VP keeps Salimans' v = alpha eps - sigma x0
    vp = make_process("vp")
    xv, _ = vp.marginal(x0, t, eps)
    torch.testing.assert_close(vp.convert(vp.velocity(x0, eps, t), "v", "eps", t, xv), eps, atol=1e-5, rtol=1e-5)
    # f and g^2 of the interpolant: g^2 = 2t / (1 - t), and the grid starts at t_max < 1 where g^2 is finite
    u = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(RF.g2(u), 2 * u / (1 - u))
    grid = RF.time_grid(10, dtype=torch.float64)
    assert float(grid[0]) == pytest.approx(0.999) and float(grid[-1]) == pytest.approx(1e-3)
    assert math.isfinite(float(RF.g2(grid[0])))
    with pytest.raises(CtrlDiffError, match="g\\^2 diverges"):
        RectifiedFlow(t_max=1.0)


def test_exact_gmm_velocity_matches_the_score_and_is_finite_at_t1():
    gmm = gmm_preset("gmm4")
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(1)) * 2
    t = torch.linspace(0.01, 0.99, 50)
    v = ExactGMMScore(gmm, RF, prediction="v")(x, t)
    eps = ExactGMMScore(gmm, RF)(x, t)
    torch.testing.assert_close(RF.convert(v, "v", "eps", t, x), eps, atol=1e-5, rtol=1e-5)
    # at t = 1 x_1 = eps is independent of x0: v = x - E[x0] = x - sum_k w_k mu_k
    v1 = gmm.velocity(x, torch.ones(50), RF)
    torch.testing.assert_close(v1, x - (gmm.weights[:, None] * gmm.means).sum(0).float(), atol=1e-6, rtol=1e-6)


def test_rf_exact_task_samples_the_mixture_and_has_zero_self_kl():
    task = build_task("gmm2-rf-exact")
    assert task.process.name == "rf" and task.model.prediction == "v" and parse_exact_spec("gmm2-rf-exact") == ("gmm2", True)
    gen = torch.Generator().manual_seed(0)
    traj = sample(task.ref, task.process, (4000, 2), 40, "heun", generator=gen)
    ref = gmm_preset("gmm2").sample(4000, torch.Generator().manual_seed(1))
    assert (traj.final.mean(0) - ref.mean(0)).abs().max() < 0.12
    assert abs(float((traj.final[:, 0] > 0).float().mean()) - 0.3) < 0.03  # the 0.7 / 0.3 mixture weights
    em = sample(task.model, task.process, (64, 2), 20, "em", generator=gen)
    kl = kl_path(task.process, em, evaluate_along(task.model, task.process, em), evaluate_along(task.ref, task.process, em))
    assert float(kl.abs().max()) == 0.0
    with pytest.raises(CtrlDiffError, match="rectified-flow yardstick"):
        build_task("gmm2-rf-exact", process="vp-cosine")


def _cfg(model, algo, **kw):
    base = dict(algo=algo, model=model, reward="toy2d-mode-switch", beta=0.5, epochs=1, batch_size=16,
                sampler=dict(solver="ddim", eta=1.0, steps=6), optim=dict(lr=1e-3, minibatch=48),
                log=dict(progress=False, tensorboard=False, num_final_eval=0, num_eval_samples=8))
    for k, v in kw.items():
        base[k] = base[k] | v if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return TrainConfig(**base)


def _residual_changed(tr, before) -> bool:
    return any(not torch.equal(before[k], v) for k, v in tr.task.model_state_dict().items())


CASES = [
    ("gmm2-rf-exact", "ctrl", {}),
    ("gmm2-rf-exact", "ctrl", dict(ctrl=dict(estimator="b"))),
    ("gmm2-rf-exact", "ddpo", {}),
    ("gmm2-rf-exact", "dpok", {}),
    ("gmm2-rf-exact", "reward-backprop", {}),
    ("gmm2-rf-exact", "diffusion-dpo", {}),
    ("gmm2-rf-exact", "ctrl", dict(sampler=dict(solver="em", steps=20))),
    ("gmm2-rf-exact", "dpok", dict(sampler=dict(solver="ode-euler", steps=6, policy_std=0.1))),
    ("scratch-gmm2", "q-learning", dict(process="rf", sampler=dict(solver="em", steps=8))),
    ("digits-rf", "ctrl", dict(reward="digit-alignment", batch_size=8, sampler=dict(steps=4))),  # 0/1 ties: no signal
    ("digits-rf", "dpok", dict(reward="digit-alignment", batch_size=8, sampler=dict(steps=4))),
    ("digits-rf", "reward-backprop", dict(reward="digit-alignment", batch_size=8, sampler=dict(steps=4))),
    ("digits-rf", "lasro", dict(reward="digit-correct", batch_size=8, sampler=dict(solver="ddim", eta=0.0, steps=2),
                                lasro=dict(initial_surrogate_steps=2, surrogate_steps=2, gen_batch=8, pairs=16))),
]


def test_kl_path_of_a_velocity_model_counts_the_first_step():
    """KL_path between two velocity models takes the velocity difference as constant over a step: on the 20-step
    rectified-flow grid each step's weight then matches the exact KL of the ddim eta = 1 Gaussian step for a constant
    velocity offset, B^2 (1 - t_k)^2 |dv|^2 / (2 std^2), within 15% on the first half of the steps and 2.5x on all but
    the last (the discrete steps near the data end, whose std shrinks fast, cost more; the first step was 360x too
    small when the eps difference was held constant), and the 2-D model evaluated against itself is 0."""
    from ctrldiff import solvers as S

    K = 20
    t = RF.time_grid(K, dtype=torch.float64)
    m = ExactGMMScore(gmm_preset("gmm2"), RF, prediction="v").double()
    traj = S.get_solver("ddim", eta=1.0)(m, torch.randn(8, 2, dtype=torch.float64), t, RF,
                                         generator=torch.Generator().manual_seed(0))
    c = S.output_factor(RF, t[:-1], "v")
    torch.testing.assert_close(c, 1 - t[:-1])
    exact = (traj.coef_b.double() * c) ** 2 / (2 * traj.std.double() ** 2)
    ratio = exact / (S.kl_weights(RF, t, prediction="v") * c * c)
    assert bool(((ratio[:10] > 1.0) & (ratio[:10] < 1.15)).all()), ratio  # 1.06-1.10
    assert bool(((ratio[:-1] > 1.0) & (ratio[:-1] < 2.5)).all()), ratio  # up to 2.15 at step 18
    old = exact / (S.kl_weights(RF, t) * c * c)
    assert float(old[0]) > 100  # the eps rule's first step
    assert float(kl_path(RF, traj, traj.outputs, traj.outputs, prediction="v").abs().max()) == 0


@pytest.mark.parametrize("model,algo,kw", CASES, ids=[f"{m}-{a}-{i}" for i, (m, a, _) in enumerate(CASES)])
def test_every_algorithm_runs_on_flow_models(model, algo, kw):
    if algo == "ctrl":  # every step is kept: this checks that the loss trains (the acceptance test: test_ctrl.py)
        kw = {**kw, "ctrl": {"held_out": 0.0, **kw.get("ctrl", {})}}
    tr = Trainer(_cfg(model, algo, **kw))
    assert tr.process.name == "rf"
    assert getattr(tr.task.model, "prediction", "eps") == "v"
    before = {k: v.clone() for k, v in tr.task.model_state_dict().items()}
    rec = tr.step()
    assert math.isfinite(rec["reward_mean"]) and math.isfinite(rec.get("train/loss", 0.0))
    assert _residual_changed(tr, before), "nothing was trained"
    kl = rec.get("kl_path", 0.0)
    assert math.isnan(kl) or (math.isfinite(kl) and kl >= 0)


def test_flow_models_default_to_the_exact_gaussian_rollout_step():
    tr = Trainer(TrainConfig(model="gmm2-rf-exact", reward="toy2d-mode-switch", epochs=1,
                             log=dict(progress=False, tensorboard=False)))
    assert (tr.cfg.sampler.solver, tr.cfg.sampler.eta) == ("ddim", 1.0)
    tr = Trainer(TrainConfig(model="gmm2-rf-exact", reward="toy2d-mode-switch", epochs=1, sampler=dict(solver="em"),
                             log=dict(progress=False, tensorboard=False)))
    assert tr.cfg.sampler.solver == "em"  # an explicit choice is kept
    assert Trainer(TrainConfig(model="gmm2-exact", reward="toy2d-mode-switch", epochs=1,
                               log=dict(progress=False, tensorboard=False))).cfg.sampler.solver == "em"


def test_shipped_digits_rf_samples_recognisable_digits(tmp_path):
    """The shipped flow-matching model: velocity prediction on 'rf', loaded by name; its 10-step Euler flow samples
    with CFG 2 are recognised by the shipped classifier (manifest: 1.000 on 1000 samples)."""
    from safetensors.torch import load_file

    from ctrldiff.assets import load_digit_classifier, load_shipped_model, read_manifest
    from ctrldiff.cli import run_sample

    m = load_shipped_model("digits-rf")
    assert m.prediction == "v" and m.metadata["process"] == {"name": "rf"}
    assert read_manifest()["assets"]["digits_rf"]["quality"]["conditional_sample_accuracy"] >= 0.95
    paths = run_sample(model_path="digits-rf", solver="ode-euler", eta=None, steps=10, guidance=2.0, seed=0,
                       label="all", n=50, out=tmp_path)
    t = load_file(str(paths["tensors"]))
    acc = float((load_digit_classifier().predict(t["samples"].clamp(-1, 1)) == t["labels"]).float().mean())
    assert acc >= 0.9


def test_ship_run_copies_the_model_and_writes_its_manifest_entry(tmp_path, monkeypatch):
    """assets.ship_run (used by benchmarks/eval_digits_rf.py and eval_digits_2step.py --write): the run's model files
    become the asset, whose manifest entry has their hashes, the command that made them and the copy, and the entry."""
    import json
    import shutil

    from ctrldiff import assets
    from ctrldiff.models import load_model
    from ctrldiff.models.base import save_model

    shipped = load_model(assets.default_digits_rf_path())
    d = tmp_path / "assets"
    d.mkdir()
    shutil.copyfile(assets.MANIFEST, d / "manifest.json")
    monkeypatch.setattr(assets, "ASSETS_DIR", d)
    monkeypatch.setattr(assets, "MANIFEST", d / "manifest.json")
    run = tmp_path / "run"
    save_model(shipped, run / "model",
               metadata={"command": "ctrldiff pretrain digits", "train_time_s": 1.5})
    stem = assets.ship_run(run, "toy_asset", load_model(run / "model"), "python measure.py", quality={"acc": 1.0})
    entry = json.loads((d / "manifest.json").read_text())["assets"]["toy_asset"]
    assert stem == d / "toy_asset" and (d / "toy_asset.safetensors").exists()
    assert entry["files"][0] == assets.file_record(d / "toy_asset.safetensors")
    assert entry["command"] == (f"ctrldiff pretrain digits && cp {run}/model.safetensors src/ctrldiff/assets/"
                                f"toy_asset.safetensors && cp {run}/model.json src/ctrldiff/assets/toy_asset.json")
    assert entry["quality"] == {"acc": 1.0} and entry["measured_by"] == "python measure.py"
    assert entry["type"] == "unet" and entry["parameters"] > 0 and entry["train_time_s"] == 1.5
    assert "toy_asset" in json.loads((d / "manifest.json").read_text())["assets"]
    assert "digits_rf" in json.loads((d / "manifest.json").read_text())["assets"]  # the others are kept
