"""The tuned LaSRO comparison (benchmarks/lasro_2step.py --sweep): the selection rule picks, per algorithm, the
feasible setting (every seed within the quality tolerance on the selection noise) with the highest mean reward and
reports it on the held-out noise; an algorithm with no feasible setting is reported as such; a tiny end-to-end
sweep writes every run with both evaluations and renders in the suite page."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, file: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load("lasro_2step", "lasro_2step.py")


def fake_run(setting: str, seed: int, r_sel: float, ok: bool, r_test: float) -> dict:
    q = {"accuracy_2step": 1.0, "frechet_2step": 10.0, "diversity_2step": 27.0, "reward_1step": 0.0,
         "accuracy_1step": 0.8, "frechet_1step": 50.0, "diversity_1step": 20.0}
    return {"setting": setting, "seed": seed, "final": {"reward_2step": r_sel, **q},
            "final_test": {"reward_2step": r_test, **q},
            "quality_within_tolerance": {"accuracy": True, "frechet": ok, "diversity": True},
            "quality_within_tolerance_test": {"accuracy": True, "frechet": True, "diversity": True}}


def test_selection_takes_the_best_setting_whose_every_seed_is_within_tolerance(bench):
    runs = [fake_run("lr=3e-05", 0, -0.30, False, -0.31), fake_run("lr=3e-05", 1, -0.38, True, -0.38),  # one seed out
            fake_run("lr=2e-05", 0, -0.389, True, -0.3895), fake_run("lr=2e-05", 1, -0.391, True, -0.3905),
            fake_run("lr=1e-05", 0, -0.3915, True, -0.391), fake_run("lr=1e-05", 1, -0.3915, True, -0.391)]
    sel = bench.select_setting(runs)
    assert sel["chosen"] == "lr=2e-05" and sel["best_infeasible"] is None
    assert sel["test"]["reward"] == [-0.3895, -0.3905]  # reported on the held-out noise, not the selection one
    assert sel["test"]["frechet"] == [10.0, 10.0] and sel["test"]["accuracy"] == [1.0, 1.0]
    assert sel["test"]["seeds"] == [0, 1] and sel["test"]["within_tolerance"] == [True, True]
    feas = {t["setting"]: t["feasible"] for t in sel["settings"]}
    assert feas == {"lr=3e-05": False, "lr=2e-05": True, "lr=1e-05": True}


def test_no_feasible_setting_is_reported_as_such(bench):
    runs = [fake_run("a", 0, -0.30, False, -0.30), fake_run("b", 0, -0.35, False, -0.35)]
    sel = bench.select_setting(runs)
    assert sel["chosen"] is None and sel["best_infeasible"] == "a"


def test_overrides_merge_into_the_run_config_and_label_it(bench):
    over = {"optim": {"lr": 1e-5}, "diffusion_dpo": {"beta_dpo": 0.5}}
    assert bench.setting_label(over) == "lr=1e-05 beta_dpo=0.5" and bench.setting_label({}) == "default"
    cfg = bench.algo_config("ddpo", "jpeg-compressibility", "digits-2step", 2, 64, 0, 3e-5, overrides=over)
    assert cfg.optim.lr == 1e-5 and cfg.optim.minibatch == 32 and cfg.diffusion_dpo.beta_dpo == 0.5
    cfg = bench.algo_config("lasro", "jpeg-compressibility", "digits-2step", 2, 64, 0, 3e-5,
                            overrides={"lasro": {"c0": 20.0}})
    assert cfg.lasro.c0 == 20.0 and cfg.lasro.freeze_surrogate is False and cfg.optim.lr == 3e-5


def test_tiny_sweep_end_to_end_and_suite_page(bench, tmp_path):
    suite = _load("bench_suite_run_lasro", "run.py")
    grid = {"lasro": [{"lasro": {"c0": 15.0}}], "ddpo": [{"optim": {"lr": 1e-5}}, {"optim": {"lr": 3e-5}}]}
    args = bench.argparse.Namespace(
        model="digits-2step", rewards="jpeg-compressibility", algos="lasro,ddpo", epochs=1, queries=16, lr=3e-5,
        seeds="0", lasro=json.dumps({"initial_surrogate_steps": 5, "gen_steps": 1, "gen_batch": 8}), eval_every=1,
        eval_n_curve=20, eval_n=40, grid=json.dumps(grid), out=str(tmp_path / "sweep.json"))
    threads = torch.get_num_threads()
    try:
        res = bench.sweep(args)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "sweep.json").read_text())["selected"] == res["selected"]
    runs = res["runs"]
    assert [(r["algo"], r["setting"]) for r in runs] == [("lasro", "c0=15"), ("ddpo", "lr=1e-05"), ("ddpo", "lr=3e-05")]
    for r in runs:
        assert r["reward_queries"] == 16 and r["final"] != r["final_test"]  # two different noise sets
        assert [c["reward_queries"] for c in r["curve"]] == [0, 16]
    sel = res["selected"]["jpeg-compressibility"]
    assert set(sel) == {"lasro", "ddpo"} and len(sel["ddpo"]["settings"]) == 2
    page = suite.render_lasro2step(res, {}, tmp_path / "fig")
    assert "chosen setting" in page and "c0=15" in page and "held-out" in page
    assert (tmp_path / "fig" / "lasro2step_jpeg-compressibility.png").exists()
    rendered = bench.render([str(tmp_path / "sweep.json")], tmp_path / "fig2")  # --render of the saved file
    assert rendered == page.replace("(benchmarks/lasro2step", "(benchmarks/sweep_lasro2step")
    assert (tmp_path / "fig2" / "sweep_lasro2step_jpeg-compressibility.png").exists()


def test_one_step_generator_selection_uses_the_one_step_numbers(bench):
    q = {"accuracy_1step": 0.85, "frechet_1step": 50.0, "diversity_1step": 20.0}
    runs = [{"setting": "a", "seed": 0, "final": {"reward_1step": 0.9, "reward_2step": 0.1, **q},
             "final_test": {"reward_1step": 0.88, "reward_2step": 0.1, "reward": None, **q},
             "quality_within_tolerance": {"frechet": True}, "quality_within_tolerance_test": {"frechet": True}}]
    for r in runs:
        r["final"].update({f"{m}_2step": 0.0 for m in ("accuracy", "frechet", "diversity")})
        r["final_test"].update({f"{m}_2step": 0.0 for m in ("accuracy", "frechet", "diversity")})
    sel = bench.select_setting(runs, k=1)
    assert sel["chosen"] == "a" and sel["test"]["reward"] == [0.88] and sel["test"]["frechet"] == [50.0]
    base = {"accuracy_1step": 0.85, "frechet_1step": 40.0, "diversity_1step": 21.0}
    assert bench.quality_ok({"accuracy_1step": 0.81, "frechet_1step": 61.0, "diversity_1step": 16.0}, base, k=1) == {
        "accuracy": True, "frechet": False, "diversity": False}
