"""The diffusers backend on tiny SD 1.5- and SDXL-shaped pipelines built from configs (no download):
the discrete schedule in continuous time, rollouts that match diffusers' own DDIM step for step, one update
of every algorithm touching only the LoRA weights, LoRA interop with plain ``pipe.load_lora_weights``, and
one-line errors for what is missing."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers extra (pip install 'ctrldiff[diffusers]') is not installed")
pytest.importorskip("peft", reason="the diffusers extra (pip install 'ctrldiff[diffusers]') is not installed")

from ctrldiff.errors import CtrlDiffError  # noqa: E402
from ctrldiff.guidance import with_guidance  # noqa: E402
from ctrldiff.models.diffusers_backend import load_diffusers_model, load_pipeline  # noqa: E402
from ctrldiff.models.diffusers_tiny import save_tiny_pipeline  # noqa: E402
from ctrldiff.noise import DiscreteVP  # noqa: E402
from ctrldiff.solvers import ddim, euler_maruyama  # noqa: E402
from ctrldiff.train.config import TrainConfig  # noqa: E402
from ctrldiff.train.trainer import Trainer  # noqa: E402
from lora_helpers import one_step  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROMPTS = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {kind: save_tiny_pipeline(root / kind, kind) for kind in ("sd15", "sdxl")}


def _prompt_file(tmp_path) -> str:
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return str(p)


# ---- the discrete VP schedule -------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_discrete_vp_matches_alphas_cumprod(schedule):
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012)
    proc = DiscreteVP.from_scheduler_config(sch.config)
    n = torch.arange(1000)
    t = proc.time_of_timestep(n)
    torch.testing.assert_close(proc.alpha(t) ** 2, sch.alphas_cumprod.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(proc.sigma(t) ** 2, 1 - sch.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)  # float32 table
    torch.testing.assert_close(proc.timestep(t), n.double())
    assert float(proc.alpha(torch.tensor(0.0, dtype=torch.float64))) == 1.0
    # f = d log alpha / dt between the nodes, g^2 = -2 f (VP), log-SNR strictly decreasing
    u = torch.linspace(0.0105, 0.9895, 300, dtype=torch.float64)
    h = 1e-7
    fd = (proc.log_alpha(u + h) - proc.log_alpha(u - h)) / (2 * h)
    torch.testing.assert_close(fd, proc.f(u), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(proc.g2(u), -2 * proc.f(u))
    dense = torch.linspace(0, 1, 20001, dtype=torch.float64)
    assert bool((proc.g2(dense) > 0).all())  # the interpolant keeps alpha strictly decreasing
    lam = proc.log_snr(torch.linspace(proc.t_min, 1, 500, dtype=torch.float64))
    assert bool((lam[1:] < lam[:-1]).all())
    # the time grid is diffusers' "trailing" spacing, ending at timestep 0
    sch.register_to_config(timestep_spacing="trailing")
    sch.set_timesteps(10)
    grid = proc.timestep(proc.time_grid(10, dtype=torch.float64))
    assert grid[:-1].round().long().tolist() == sch.timesteps.tolist() and float(grid[-1]) == pytest.approx(0.0)
    with pytest.raises(CtrlDiffError, match="1..1000"):
        proc.time_grid(1001)


def test_discrete_time_grid_is_strictly_decreasing_for_every_step_count():
    """Every K = 1..N: K + 1 strictly decreasing times (float64 and float32), the K starts are diffusers' trailing
    timesteps, the end is timestep 0 (t_min) or, once timestep 0 is the last start (K >= 667), t = 1 / (2N).
    (Before, K = 667..999 repeated t_min and every solver refused the grid.)"""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        timestep_spacing="trailing", set_alpha_to_one=False)
    proc = DiscreteVP.from_scheduler_config(sch.config)
    N = proc.N
    for K in range(1, N + 1):
        grid = proc.time_grid(K, dtype=torch.float64)
        assert grid.shape == (K + 1,) and bool((grid[1:] < grid[:-1]).all()), K
        g32 = proc.time_grid(K)
        assert bool((g32[1:] < g32[:-1]).all()), K
        sch.set_timesteps(K)
        # (for 62 of the K, e.g. 61, numpy's float arange gives diffusers one more timestep, -1: not a timestep)
        theirs = sch.timesteps.tolist()
        assert theirs[K:] in ([], [-1]), K
        assert proc.timestep(grid[:-1]).round().long().tolist() == theirs[:K], K
        last_start = theirs[K - 1]
        assert float(grid[-1]) == (1 / N if last_start > 0 else 0.5 / N), K
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    for K in (666, 667, 999, 1000):  # every solver takes these grids
        traj = ddim(lambda x, t, c=None: 0.1 * x, x, proc.time_grid(K), proc, eta=1.0,
                    generator=torch.Generator().manual_seed(1))
        assert traj.num_steps == K and bool(torch.isfinite(traj.final).all())


class _AnalyticEps(torch.nn.Module):
    """eps(x, n) = 0.5 sin(x) + n / 2000 for the UNet timestep n = N t - 1: a smooth stand-in for a UNet."""

    prediction = "eps"

    def __init__(self, proc):
        super().__init__()
        self.proc = proc

    def forward(self, x, t, cond=None):
        n = self.proc.timestep(t.double()).to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return 0.5 * torch.sin(x) + n / 2000


def _diffusers_ddim(sch, model, x, K):
    sch.set_timesteps(K)
    x = x * sch.init_noise_sigma
    for n in sch.timesteps:
        eps = 0.5 * torch.sin(x) + float(n) / 2000
        x = sch.step(eps, n, x, eta=0.0).prev_sample
    return x


def test_ddim_matches_diffusers_scheduler_where_k_divides_n():
    """DDIM(eta=0) from the same noise (start std 1, diffusers' init_noise_sigma) equals DDIMScheduler(trailing,
    set_alpha_to_one=False) for every K dividing N (to 1e-5 relative). The stated limit for other K: diffusers steps to
    n_k - N // K, which differs from the next timestep n_{k+1} (ctrldiff's target) by exactly one timestep in
    some steps and by nothing more."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                        timestep_spacing="trailing", set_alpha_to_one=False)
    proc = DiscreteVP.from_scheduler_config(sch.config)
    assert proc.prior_std() == sch.init_noise_sigma == 1.0
    model = _AnalyticEps(proc)
    z = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for K in (1, 2, 4, 5, 8, 10, 20, 25, 40, 50, 100, 125, 200, 250, 500):
        ours = ddim(model, z * proc.prior_std(), proc.time_grid(K, dtype=torch.float64), proc, eta=0.0).final
        theirs = _diffusers_ddim(sch, model, z.float(), K).double()
        assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5, K  # diffusers computes in float32
    for K in (3, 7, 30, 300):
        sch.set_timesteps(K)
        starts = sch.timesteps.tolist()
        theirs = [n - proc.N // K for n in starts]  # diffusers' prev_timestep (-1: alphas_cumprod[0], timestep 0)
        ours = proc.timestep(proc.time_grid(K, dtype=torch.float64)[1:]).round().long().tolist()
        diff = [a - max(b, 0) for a, b in zip(ours, theirs, strict=True)]
        assert set(diff) == {0, -1}, (K, diff)


# ---- rollouts match diffusers' own DDIM -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_ddim_rollout_matches_diffusers_pipeline(pipes, kind):
    m = load_diffusers_model(str(pipes[kind]), PROMPTS)
    x = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([0, 2])
    K = 4
    with torch.no_grad():
        ours = ddim(with_guidance(m.ref, 3.0), x, m.process.time_grid(K), m.process, cond, eta=0.0).final
        theirs = m.pipe(prompt=["cat", "fox"], latents=x.clone(), num_inference_steps=K, guidance_scale=3.0, eta=0.0,
                        output_type="latent", height=m.resolution, width=m.resolution).images
        em = euler_maruyama(m.model, x, m.process.time_grid(K), m.process, cond, generator=torch.Generator().manual_seed(1))
    scale = theirs.abs().max()
    assert float((ours - theirs).abs().max() / scale) < 1e-5
    assert em.final.shape == x.shape and bool(torch.isfinite(em.final).all()) and em.stochastic
    img = m.decode(ours)
    assert img.shape == (2, 3, m.resolution, m.resolution) and float(img.abs().max()) <= 1.0


def test_v_prediction_is_read_from_the_scheduler(tmp_path):
    # (a step count dividing 1000: diffusers' DDIM steps from t to t - 1000 // K, which for other K is not the
    # next timestep it evaluates; ctrldiff's grid is the sequence of timesteps itself)
    d = save_tiny_pipeline(tmp_path / "v", "sd15", prediction_type="v_prediction")
    m = load_diffusers_model(str(d), PROMPTS)
    assert m.prediction == "v"
    x = torch.randn(1, *m.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = ddim(m.ref, x, m.process.time_grid(5), m.process, torch.tensor([1]), eta=0.0).final
        theirs = m.pipe(prompt=["dog"], latents=x.clone(), num_inference_steps=5, guidance_scale=1.0, eta=0.0,
                        output_type="latent", height=m.resolution, width=m.resolution).images
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5


# ---- every algorithm updates the LoRA weights and only them ------------------------------------------
def _cfg(model, algo, prompts, **kw):
    base = dict(algo=algo, model=str(model), reward="jpeg-compressibility", beta=0.1, epochs=1, batch_size=4,
                sampler=dict(solver="ddim", eta=1.0, steps=3, guidance=2.0), optim=dict(lr=1e-2, minibatch=6, microbatch=3),
                log=dict(progress=False, tensorboard=False), diffusers=dict(prompts=prompts, lora_rank=2),
                ctrl=dict(value=dict(epochs=1, surrogate_steps=2)))
    base.update(kw)
    return TrainConfig(**base)


def brightness(x, cond):
    """A differentiable reward on decoded images that checks it gets prompt strings."""
    assert isinstance(cond, list) and all(isinstance(c, str) for c in cond) and len(cond) == x.shape[0]
    assert x.ndim == 4 and x.shape[1] == 3
    return x.mean((1, 2, 3))


brightness.differentiable = True


@pytest.mark.parametrize("kind,algo,extra", [("sd15", "ctrl", ""), ("sd15", "ddpo", ""), ("sdxl", "ctrl", ""),
                                             ("sdxl", "ddpo", ""), ("sd15", "dpok", ""), ("sd15", "ctrl", "b"),
                                             ("sd15", "reward-backprop", "diff"), ("sd15", "diffusion-dpo", ""),
                                             ("sdxl", "lasro", ""), ("sd15", "adjoint-matching", "diff"),
                                             ("sd15", "flow-grpo", ""), ("sd15", "diffusion-nft", "")])
def test_one_update_changes_only_the_lora_weights(pipes, tmp_path, kind, algo, extra):
    kw, reward = {}, None
    if extra == "b":  # CTRL(b) with the true, differentiable reward on the decoded Tweedie prediction
        kw, reward = dict(ctrl=dict(estimator="b", value=dict(epochs=1, reward_term="true"))), brightness
    elif extra == "diff":
        reward = brightness
    if algo == "diffusion-dpo":
        kw["batch_size"] = 8  # pairs of samples of one prompt: >= 2 per prompt
    if algo == "flow-grpo":  # groups of 2 rollouts per prompt
        kw["flow_grpo"] = dict(group_size=2)
    if algo == "diffusion-nft":  # groups of 2 rollouts per prompt, from the deterministic DDIM sampler
        kw.update(diffusion_nft=dict(group_size=2, draws=2, minibatch=4),
                  sampler=dict(solver="ddim", eta=0.0, steps=3, guidance=2.0))
    if algo == "lasro":  # a <= 2-step generator; the surrogate reads the UNet's encoder features
        kw.update(batch_size=8, sampler=dict(solver="ddim", eta=0.0, steps=2),
                  lasro=dict(initial_surrogate_steps=2, surrogate_steps=2))
    tr = Trainer(_cfg(pipes[kind], algo, _prompt_file(tmp_path), **kw), reward=reward)
    assert tr.cfg.log.num_eval_samples == 8 and tr.cfg.optim.microbatch == 3  # family default / explicit value
    rec, before, changed = one_step(tr)
    assert changed, "nothing was trained"
    assert all(".lora_" in k for k in changed), sorted(k for k in changed if ".lora_" not in k)[:3]
    assert any(".lora_B." in k for k in changed)
    assert set(tr.task.model_state_dict()) == {k.removeprefix("unet.") for k in before if ".lora_" in k}
    assert rec["reward_queries"] >= 4 and any(k.startswith("reward_by_cond/") and k.split("/")[1] in PROMPTS
                                              for k in rec)


# ---- LoRA interop: plain diffusers loads the run's LoRA and samples what ctrldiff samples ---------------
def test_lora_roundtrip_with_plain_diffusers(pipes, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    cfg = _cfg(pipes["sd15"], "ddpo", _prompt_file(tmp_path), epochs=2, optim=dict(lr=5e-2, minibatch=6),
               diffusers=dict(prompts=_prompt_file(tmp_path), lora_rank=2, lora_alpha=6.0),
               log=dict(progress=False, tensorboard=False, num_final_eval=2, num_eval_samples=2))
    tr = Trainer(cfg, out)
    tr.train()
    lora = out / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.is_file() and (out / "samples" / "before_after.png").is_file()
    assert json.loads((out / "lora" / "ctrldiff.json").read_text())["fine_tuned_by"] == "ddpo"
    K, g = 4, 2.0
    x = torch.randn(2, *tr.task.sample_shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = ddim(with_guidance(tr.task.model, g), x, tr.process.time_grid(K), tr.process, torch.tensor([0, 1]),
                    eta=0.0).final
    pipe = StableDiffusionPipeline.from_pretrained(str(pipes["sd15"]), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPTS[:2], num_inference_steps=K, guidance_scale=g, eta=0.0, output_type="latent")
    with torch.no_grad():
        plain = pipe(latents=x.clone(), **kw).images
        pipe.load_lora_weights(str(out / "lora"))
        tuned = pipe(latents=x.clone(), **kw).images
    scale = tuned.abs().max()
    assert float((plain - tuned).abs().max() / scale) > 1e-3, "the LoRA changed nothing"
    assert float((ours - tuned).abs().max() / scale) < 1e-4
    # a checkpoint holds the LoRA weights only, and a resumed run restores them
    resumed = Trainer(cfg, out, resume=True)
    for k, v in tr.task.model_state_dict().items():
        assert torch.equal(resumed.task.model_state_dict()[k], v)


def test_eval_of_a_diffusers_run_reproduces_its_final_eval(pipes, tmp_path):
    """``ctrldiff eval RUN_DIR`` on a LoRA run: the latest checkpoint's LoRA on the pipeline, the run's prompts,
    decoded images for the reward; with the final evaluation's seed / n / solver it gives the same numbers.
    ``ctrldiff report`` builds its page (with the robustness table) for the same run."""
    from click.testing import CliRunner

    from ctrldiff.cli import main

    out = tmp_path / "run"
    cfg = _cfg(pipes["sd15"], "ddpo", _prompt_file(tmp_path), epochs=2, optim=dict(lr=5e-2, minibatch=6),
               log=dict(progress=False, tensorboard=False, num_final_eval=3, num_eval_samples=2))
    Trainer(cfg, out).train()
    after = json.loads((out / "final_eval.json").read_text())["after"]
    r = CliRunner().invoke(main, ["eval", str(out), "--n", "3", "--seed", "4321", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["kind"] == "text-to-image" and doc["prompts"] == PROMPTS and doc["guidance"] == 2.0
    assert doc["weights"].endswith(".pt") and "checkpoints" in doc["weights"]
    res = doc["results"][0]
    assert res["label"] == "ddim:3 (eta 1)"
    assert res["reward_mean"] == pytest.approx(after["reward_mean"], rel=1e-6, abs=1e-9)
    assert res["kl_path"] == pytest.approx(after["kl_path"], rel=1e-5, abs=1e-9) and res["kl_path"] > 0
    # another solver, and the human-readable table
    r = CliRunner().invoke(main, ["eval", str(out), "--n", "2", "--solvers", "ddim:2,em:3"])
    assert r.exit_code == 0, r.output
    assert "ddim:2" in r.output and "em:3" in r.output and "KL_path" in r.output
    r = CliRunner().invoke(main, ["eval", str(out), "--n", "2", "--ref", "digits"])
    assert r.exit_code != 0 and "--ref is not available for a diffusers run" in r.output
    # ctrldiff report on the same run: curves, summary, the robustness table from these evaluations, samples
    r = CliRunner().invoke(main, ["report", str(out), "--out", str(tmp_path / "r.html"), "--solvers", "ddim:2",
                                  "--n", "2"])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "r.html").read_text()
    assert "ddim:2" in page and "before/after" in page and "Traceback" not in page and "error" not in page.lower()


def test_full_finetune_saves_a_pipeline(pipes, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "full"
    cfg = _cfg(pipes["sd15"], "ddpo", _prompt_file(tmp_path), optim=dict(lr=1e-3, minibatch=6),
               diffusers=dict(prompts=_prompt_file(tmp_path), full_finetune=True),
               log=dict(progress=False, tensorboard=False, num_final_eval=0, num_eval_samples=2))
    tr = Trainer(cfg, out)
    base = {n: p.detach().clone() for n, p in tr.task.ref.unet.named_parameters()}
    tr.train()
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "pipeline"), safety_checker=None)
    trained = dict(pipe.unet.named_parameters())
    assert any(not torch.equal(trained[n], p) for n, p in base.items())
    assert all(torch.equal(p, base[n]) for n, p in tr.task.ref.unet.named_parameters())  # the reference is frozen


# ---- prompt sets and per-prompt statistics ----------------------------------------------------------------
def test_prompt_sets(tmp_path):
    from ctrldiff.data.prompts import load_prompts
    from ctrldiff.rewards.stats import PerConditionStats

    assert len(load_prompts("simple-animals")) == 45 and "cat" in load_prompts("simple-animals")
    assert len(load_prompts("imagenet-animals")) >= 10
    f = tmp_path / "p.txt"
    f.write_text("a red apple\n\n# a comment\n  a blue car  \n")
    assert load_prompts(str(f)) == ["a red apple", "a blue car"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(CtrlDiffError, match="holds no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(CtrlDiffError, match="neither a built-in"):
        load_prompts("no-such-prompt-set")
    st = PerConditionStats(buffer_size=8, min_count=2)
    adv = st.advantages(torch.tensor([1.0, 3.0, 10.0, 14.0]), ["cat", "cat", "dog", "dog"])
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    assert st.summary() == {"reward_by_cond/cat": 2.0, "reward_by_cond/dog": 12.0}
    st2 = PerConditionStats(8, 2)
    st2.load_state_dict(st.state_dict())
    assert st2.buffers.keys() == st.buffers.keys()


# ---- one-line errors ---------------------------------------------------------------------------------------
def test_missing_and_wrong_pipelines_give_one_line_errors(pipes, tmp_path):
    bad = tmp_path / "noweights"
    shutil.copytree(pipes["sd15"], bad)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CtrlDiffError, match="component 'unet' has no weights file") as e:
        load_pipeline(str(bad))
    assert "\n" not in str(e.value)
    wrong = tmp_path / "wrong"
    shutil.copytree(pipes["sd15"], wrong)
    idx = json.loads((wrong / "model_index.json").read_text())
    idx["_class_name"] = "KandinskyPipeline"
    (wrong / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(CtrlDiffError, match="'KandinskyPipeline' is not supported"):
        load_pipeline(str(wrong))
    (tmp_path / "plain").mkdir()
    with pytest.raises(CtrlDiffError, match="no model_index.json"):
        load_pipeline(str(tmp_path / "plain"))
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(CtrlDiffError, match="holds no prompts"):
        Trainer(_cfg(pipes["sd15"], "ddpo", str(tmp_path / "e.txt")))


def _cli(args, **env):
    e = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "ctrldiff", *args], capture_output=True, text=True, env=e, timeout=120)


def test_unreachable_hub_id_fails_fast_with_one_line(tmp_path):
    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(tmp_path / "hf"))
        with pytest.raises(CtrlDiffError, match="HF_HUB_OFFLINE is set and it is not in the local HF cache"):
            load_pipeline("nobody-xyz/no-such-pipeline-123")
    assert time.perf_counter() - t0 < 10
    r = _cli(["train", "--model", "nobody-xyz/no-such-pipeline-123", "--epochs", "1", "--out", str(tmp_path / "r"),
              "--quiet"], HF_HOME=str(tmp_path / "hf"))
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "nobody-xyz/no-such-pipeline-123" in lines[0] and "HF_HUB_OFFLINE" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_importing_ctrldiff_does_not_import_diffusers():
    code = ("import sys, ctrldiff.cli, ctrldiff.train.trainer, ctrldiff.train.task\n"
            "print('diffusers' in sys.modules, 'transformers' in sys.modules)\n"
            "sys.modules['diffusers'] = None  # as if it were not installed\n"
            "from ctrldiff.errors import CtrlDiffError\n"
            "try:\n    ctrldiff.train.task.build_task('owner/some-model')\nexcept CtrlDiffError as e:\n    print(e)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC})
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["False", "False"], r.stderr
    assert "needs diffusers (not installed): pip install 'ctrldiff[diffusers]'" in lines[1], r.stdout + r.stderr


def test_kl_path_logging_can_be_skipped_only_where_the_update_does_not_need_it():
    import math

    def cfg(algo):
        return TrainConfig(algo=algo, model="gmm2-exact", reward="toy2d-mode-switch", beta=0.5, epochs=1, batch_size=16,
                           sampler=dict(solver="em", steps=4), log=dict(progress=False, tensorboard=False, kl_path=False))

    assert math.isnan(Trainer(cfg("ddpo")).step()["kl_path"])
    rec = Trainer(cfg("dpok")).step()  # DPOK's loss uses eps_ref: always evaluated
    assert math.isfinite(rec["kl_path"])


@pytest.mark.parametrize("algo", ["ddpo", "ctrl"])
def test_reusing_the_rollout_graph_gives_the_same_update(pipes, tmp_path, algo):
    """optim.reuse_rollout_graph takes the policy step through the rollout's own graph (one model forward per
    pair fewer): the same update as evaluating the policy again, which it still is before the step."""
    def run(reuse):
        cfg = _cfg(pipes["sd15"], algo, _prompt_file(tmp_path),
                   optim=dict(lr=1e-2, minibatch=12, microbatch=4, reuse_rollout_graph=reuse))
        tr = Trainer(cfg)
        rec = tr.step()
        return tr.task.model_state_dict(), rec

    (a, ra), (b, rb) = run(False), run(True)
    # Adam's first step is ~lr sign(grad): compare the gradient's norm and the loss too
    assert rb["train/grad_norm"] == pytest.approx(ra["train/grad_norm"], rel=1e-4) and ra["train/grad_norm"] > 0
    # at theta_old the loss is about 0 (centred advantages, ratio 1, no KL yet): only its rounding differs, which is
    # CPU-dependent (up to ~1e-6 on AVX-512), far below the advantages' size
    assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-4, abs=1e-5)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    with pytest.raises(CtrlDiffError, match="one policy step per epoch"):
        Trainer(_cfg(pipes["sd15"], algo, _prompt_file(tmp_path), optim=dict(minibatch=6, reuse_rollout_graph=True)))
