"""Progressive distillation: the halving target's identity, config validation, and the ``ctrldiff distill``
command on a tiny teacher (its 2-step student beats the teacher's own 2-step samples)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from pydantic import ValidationError

from ctrldiff.cli import main
from ctrldiff.models import load_model
from ctrldiff.noise import make_process
from ctrldiff.solvers import sample
from ctrldiff.train.distill import DistillConfig, ddim_step, distill_target
from ctrldiff.train.pretrain import PretrainConfig, pretrain


def test_distill_target_takes_one_ddim_step_to_the_teacher_state():
    proc = make_process("vp")
    g = torch.Generator().manual_seed(0)
    x_t, x_s = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64), torch.randn(5, 1, 8, 8, generator=g,
                                                                                       dtype=torch.float64)
    t = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.1], dtype=torch.float64)
    s = t - 0.05
    x0 = distill_target(proc, x_t, x_s, t, s)
    eps = (x_t - proc.alpha(t).reshape(-1, 1, 1, 1) * x0) / proc.sigma(t).reshape(-1, 1, 1, 1)
    assert torch.allclose(ddim_step(proc, x_t, eps, t, s), x_s, atol=1e-8)


def test_ddim_step_matches_the_solver():
    from ctrldiff.solvers import ddim_coeffs

    proc = make_process("vp")
    x, eps = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    t, s = torch.tensor(0.7), torch.tensor(0.2)
    a, b, std = ddim_coeffs(proc, t, s, 0.0)
    assert std == 0 and torch.allclose(ddim_step(proc, x, eps, t.double(), s.double()), a * x + b * eps)


def test_config_needs_a_power_of_two_ratio():
    with pytest.raises(ValidationError, match="power of 2"):
        DistillConfig(teacher_steps=6, target_steps=2)
    DistillConfig(teacher_steps=8, target_steps=1)


def test_distill_command_beats_the_teachers_two_step_samples(tmp_path):
    """Tiny teacher (pretrained a few hundred steps), 8 -> 4 -> 2 steps. Cheap metric: mean squared
    distance to the teacher's 64-step DDIM output from the same noise (what distillation approximates)."""
    tiny = {"channels": [8, 16], "emb_dim": 32, "groups": 4}
    pretrain(PretrainConfig(dataset="digits", steps=100, batch_size=64, warmup_steps=20, lr=3e-3, log_every=100,
                            checkpoint_every=100, model=tiny, out=str(tmp_path / "teacher")), log=None)
    res = CliRunner().invoke(main, ["distill", "--teacher", str(tmp_path / "teacher" / "model"), "--teacher-steps",
                                    "8", "--target-steps", "2", "--steps-per-halving", "50", "--batch-size", "64",
                                    "--lr", "1e-3", "--log-every", "25", "--out", str(tmp_path / "student")])
    assert res.exit_code == 0, res.output
    assert "4 -> 2 steps" in res.output
    teacher, student = load_model(tmp_path / "teacher" / "model"), load_model(tmp_path / "student" / "model")
    assert student.metadata["generator_steps"] == 2 and student.metadata["sampler"]["solver"] == "ddim"
    assert (tmp_path / "student" / "student_4step.safetensors").exists()
    proc = make_process("vp")
    cond = torch.arange(200) % 10

    def draw(m, steps):
        with torch.no_grad():
            return sample(m, proc, (200, 1, 8, 8), steps, "ddim", cond=cond, generator=torch.Generator().manual_seed(7),
                          eta=0.0).final

    ref = draw(teacher, 64)
    err_teacher = (draw(teacher, 2) - ref).pow(2).mean()
    err_student = (draw(student, 2) - ref).pow(2).mean()
    assert err_student < 0.7 * err_teacher, (float(err_student), float(err_teacher))


def test_shipped_two_step_generator_loads_as_a_task_and_samples_digits():
    from ctrldiff import assets
    from ctrldiff.train.task import build_task

    assert {"digits_2step.safetensors", "digits_2step.json"} <= set(assets.verify_manifest())
    task = build_task("digits-2step")
    assert task.name == "digits-2step" and task.num_classes == 10 and task.sample_shape == (1, 8, 8)
    assert task.model.metadata["generator_steps"] == 2 and task.model.metadata["teacher"] == "digits"
    clf = assets.load_digit_classifier().eval()
    cond = torch.arange(100) % 10
    with torch.no_grad():
        x = sample(task.ref, task.process, (100, 1, 8, 8), 2, "ddim", cond=cond,
                   generator=torch.Generator().manual_seed(0), eta=0.0).final
    assert float((clf.predict(x.clamp(-1, 1)) == cond).float().mean()) >= 0.9
