"""Reward protocol: built-ins, user callables by import path, weighted sums, output checks."""

import sys
import textwrap

import pytest
import torch

from ctrldiff.errors import CtrlDiffError, RewardError
from ctrldiff.rewards import WeightedSum, available, call_reward, make_reward


def test_builtins_are_listed_and_flagged():
    names = available()
    for n in ("digit-alignment", "digit-correct", "jpeg-compressibility", "jpeg-incompressibility",
              "toy2d-quadratic", "toy2d-mode-switch"):
        assert n in names
    assert make_reward("digit-alignment").differentiable
    assert not make_reward("digit-correct").differentiable
    assert not make_reward("jpeg-compressibility").differentiable
    assert make_reward("toy2d-quadratic").differentiable


def test_jpeg_reward_prefers_flat_images():
    flat = torch.zeros(2, 1, 8, 8)
    noise = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    comp = make_reward("jpeg-compressibility")
    assert bool((comp(flat) > comp(noise)).all())
    inc = make_reward("jpeg-incompressibility")
    torch.testing.assert_close(inc(noise), -comp(noise))


def test_digit_alignment_on_real_digits():
    from ctrldiff.data.digits import load_digits

    data = load_digits("test")
    x, y = data.images[:50].clone(), data.labels[:50]
    r = make_reward("digit-alignment")(x, y)
    assert r.shape == (50,) and float(r.mean()) > -0.1  # the shipped classifier is confident on real digits
    wrong = make_reward("digit-alignment")(x, (y + 1) % 10)
    assert float(wrong.mean()) < -3
    assert float(make_reward("digit-correct")(x, y).mean()) > 0.95
    x.requires_grad_(True)
    make_reward("digit-alignment")(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_weighted_sum_and_parsing():
    w = make_reward("2*toy2d-quadratic + 0.5*toy2d-ring")
    assert isinstance(w, WeightedSum) and w.differentiable
    x = torch.randn(7, 2)
    expected = 2 * make_reward("toy2d-quadratic")(x) + 0.5 * make_reward("toy2d-ring")(x)
    torch.testing.assert_close(w(x), expected)
    assert not make_reward("1.0*toy2d-quadratic, 1e-1*jpeg-compressibility").differentiable
    with pytest.raises(CtrlDiffError, match="cannot parse"):
        make_reward("2*toy2d-quadratic + *")


def test_user_reward_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        import torch

        def brightness(x, cond=None):
            return x.flatten(1).mean(1)

        brightness.differentiable = True

        class Factory:
            name = "factory-made"
            differentiable = False

            def __call__(self, x, cond=None):
                return torch.ones(len(x))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    r = make_reward("my_rewards:brightness")
    assert r.differentiable and r.name == "my_rewards:brightness"
    torch.testing.assert_close(r(torch.ones(3, 1, 2, 2)), torch.ones(3))
    f = make_reward("my_rewards:Factory")
    assert f.name == "factory-made" and float(f(torch.zeros(4, 2)).sum()) == 4
    with pytest.raises(CtrlDiffError, match="cannot import"):
        make_reward("my_rewards:missing")
    with pytest.raises(CtrlDiffError, match="cannot import"):
        make_reward("no_such_module_xyz:fn")
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize("out,msg", [
    (torch.tensor([1.0, float("inf")]), "non-finite"),
    (torch.ones(3), "shape"),
    (torch.ones(2, 2), "shape"),
    ("text", "returned str"),
])
def test_call_reward_checks_outputs(out, msg):
    def bad(x, cond=None):
        return out

    with pytest.raises(RewardError, match=msg) as e:
        call_reward(make_reward(bad), torch.zeros(2, 2), None, batch_index=7)
    assert "batch 7" in str(e.value) and "bad" in str(e.value)


def test_call_reward_accepts_column_vectors_and_ints():
    r = call_reward(make_reward(lambda x, c=None: torch.ones(len(x), 1)), torch.zeros(3, 2), None)
    assert r.shape == (3,)
    r = call_reward(make_reward(lambda x, c=None: torch.ones(len(x), dtype=torch.int64)), torch.zeros(3, 2), None)
    assert r.dtype == torch.float32


def test_reward_arguments_in_spec_strings():
    from ctrldiff.rewards.base import parse_reward_args

    assert parse_reward_args("r", "http://h:1/x?a=b;timeout=2.5;retries=3;flag=true;name=abc") == (
        ["http://h:1/x?a=b"], {"timeout": 2.5, "retries": 3, "flag": True, "name": "abc"})
    assert parse_reward_args("r", "path=/w/a=b") == ([], {"path": "/w/a=b"})
    with pytest.raises(CtrlDiffError, match="argument 'retries' is given twice"):
        parse_reward_args("r", "u;retries=1;retries=2")
    with pytest.raises(CtrlDiffError, match="argument 'oops' must look like key=value"):
        parse_reward_args("r", "u;oops")
    assert make_reward("jpeg-compressibility:quality=50").quality == 50
    w = make_reward("2*toy2d-quadratic + 0.5*remote:http://127.0.0.1:9;timeout=3")
    assert isinstance(w, WeightedSum) and not w.differentiable and w.terms[1][1].timeout == 3.0
    with pytest.raises(CtrlDiffError, match=r"reward 'toy2d-ring': bad arguments 'x=1' \(unknown argument\(s\) x\); "
                                            "it takes: radius, width, center"):
        make_reward("toy2d-ring:x=1")
    x = torch.randn(5, 2)
    torch.testing.assert_close(make_reward("toy2d-mode-switch:strength=3")(x),
                               make_reward("toy2d-mode-switch", strength=3.0)(x))
