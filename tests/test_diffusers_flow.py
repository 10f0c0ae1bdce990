"""Flow-matching diffusers pipelines (SD3 / SD3.5, FLUX.1) on tiny random-weight pipelines built from configs (no
download): the scheduler's shifted sigmas as ctrldiff's time grid, the deterministic sampler equal to the pipeline's
own output, KL_path of a model to itself, every algorithm touching only the LoRA weights, the LoRA round trip through
plain ``pipe.load_lora_weights``, and one-line errors."""

import math

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers extra (pip install 'ctrldiff[diffusers]') is not installed")
pytest.importorskip("peft", reason="the diffusers extra (pip install 'ctrldiff[diffusers]') is not installed")

from ctrldiff.errors import CtrlDiffError  # noqa: E402
from ctrldiff.guidance import with_guidance  # noqa: E402
from ctrldiff.models.diffusers_backend import DiffusersConfig, load_diffusers_model  # noqa: E402
from ctrldiff.models.diffusers_flux import pack, unpack  # noqa: E402
from ctrldiff.models.diffusers_tiny import save_tiny_pipeline  # noqa: E402
from ctrldiff.noise import FlowMatch  # noqa: E402
from ctrldiff.solvers import ddim, evaluate_along, kl_path, ode_euler  # noqa: E402
from ctrldiff.train.config import TrainConfig  # noqa: E402
from ctrldiff.train.trainer import Trainer  # noqa: E402
from lora_helpers import one_step  # noqa: E402

PROMPTS = ["cat", "dog", "fox"]
RES = 16  # pixels: latents [4, 8, 8]
GUIDANCE = {"sd3": 3.0, "flux": None}  # FLUX.1 [dev] is guidance-distilled: its guidance is an embedding


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowpipes")
    return {kind: save_tiny_pipeline(root / kind, kind) for kind in ("sd3", "flux")}


def _load(path, **kw):
    return load_diffusers_model(str(path), PROMPTS, DiffusersConfig(resolution=RES, max_sequence_length=16, **kw))


def _pipe_call(m, kind, x, K, prompts, guidance, states):
    """The pipeline's own sampler on ctrldiff's grid (passed as unshifted ``sigmas``), collecting its latents."""
    u = m.process.unshift_time(m.process.time_grid(K, dtype=torch.float64))[:K].tolist()

    def grab(pipe, i, t, kw):
        states.append(unpack(kw["latents"], *x.shape[2:]) if kind == "flux" else kw["latents"].clone())
        return kw

    kw = dict(prompt=prompts, num_inference_steps=K, sigmas=u, output_type="latent", height=RES, width=RES,
              max_sequence_length=16, callback_on_step_end=grab)
    if kind == "sd3":
        out = m.pipe(latents=x.clone(), guidance_scale=guidance, **kw).images
    else:
        out = unpack(m.pipe(latents=pack(x.clone()), guidance_scale=m.model.embedded_guidance, **kw).images,
                     *x.shape[2:])
    return out


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_time_grid_is_the_schedulers_shifted_sigmas(pipes, kind):
    m = _load(pipes[kind])
    proc = m.process
    assert isinstance(proc, FlowMatch) and m.prediction == "v"
    sched = m.pipe.scheduler
    if kind == "sd3":
        assert proc.shift == sched.config.shift == 3.0
    else:  # FLUX: exp(mu), mu from the packed image sequence length (RES / 2 / 2)^2 = 16
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        assert proc.shift == pytest.approx(math.exp(calculate_shift(16)), rel=1e-12)
    for K in (1, 4, 28):
        grid = proc.time_grid(K, dtype=torch.float64)
        assert float(grid[0]) == pytest.approx(0.995) and float(grid[-1]) == pytest.approx(1e-3)
        u = proc.unshift_time(grid)
        torch.testing.assert_close(u[1:] - u[:-1], torch.full((K,), float(u[1] - u[0]), dtype=torch.float64))
        sched.set_timesteps(sigmas=u[:K].tolist(), mu=math.log(proc.shift) if kind == "flux" else None)
        assert float((sched.sigmas[:K].double() - grid[:K]).abs().max()) < 1e-6
        assert float(sched.sigmas[K]) == 0.0
    # the scheduler's own default sigmas are the same shift map of a uniform grid
    sched.set_timesteps(10, mu=math.log(proc.shift) if kind == "flux" else None)
    s = sched.sigmas[:10].double()
    torch.testing.assert_close(proc.shift_time(proc.unshift_time(s)), s)
    ud = proc.unshift_time(s)
    assert float((ud[1:] - ud[:-1]).std()) < 1e-6


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_deterministic_sampler_equals_the_pipeline(pipes, kind):
    m = _load(pipes[kind])
    x = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(0))
    cond, K = torch.tensor([0, 2]), 4
    times = m.process.time_grid(K)
    model = with_guidance(m.ref, GUIDANCE[kind])
    with torch.no_grad():
        euler = ode_euler(model, x, times, m.process, cond)
        dd = ddim(model, x, times, m.process, cond, eta=0.0)
        states = []
        theirs = _pipe_call(m, kind, x, K, ["cat", "fox"], GUIDANCE[kind], states)
    scale = theirs.abs().max()
    for traj in (euler, dd):
        for k in range(1, K):  # every intermediate latent of the pipeline's loop
            assert float((traj.states[:, k] - states[k - 1]).abs().max() / scale) < 1e-5, k
        # the pipeline's last Euler step to sigma = 0 is the Tweedie x0_hat at the last evaluated point
        x0 = m.process.convert(traj.outputs[:, K - 1], "eps", "x0", times[K - 1].expand(2), traj.states[:, K - 1])
        assert float((x0 - theirs).abs().max() / scale) < 1e-5
    img = m.decode(euler.final)
    assert img.shape == (2, 3, RES, RES) and float(img.abs().max()) <= 1.0


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_kl_path_of_the_model_to_itself_is_zero(pipes, kind):
    m = _load(pipes[kind])
    x = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        traj = ddim(m.model, x, m.process.time_grid(3), m.process, torch.tensor([0, 1]), eta=1.0,
                    generator=torch.Generator().manual_seed(2))
        kl = kl_path(m.process, traj, evaluate_along(m.model, m.process, traj), evaluate_along(m.ref, m.process, traj))
    assert traj.stochastic and float(kl.abs().max()) == 0.0  # LoRA B = 0 at init: the policy is the reference


def _prompt_file(tmp_path) -> str:
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return str(p)


def _cfg(model, algo, prompts, kind, **kw):
    base = dict(algo=algo, model=str(model), reward="jpeg-compressibility", beta=0.1, epochs=1, batch_size=4,
                sampler=dict(steps=3, guidance=GUIDANCE[kind]), optim=dict(lr=1e-2, minibatch=6, microbatch=3),
                log=dict(progress=False, tensorboard=False, num_final_eval=0, num_eval_samples=2),
                diffusers=dict(prompts=prompts, lora_rank=2, resolution=RES, max_sequence_length=16),
                ctrl=dict(value=dict(epochs=1, surrogate_steps=2)))
    base.update(kw)
    return TrainConfig(**base)


def brightness(x, cond):
    return x.mean((1, 2, 3))


brightness.differentiable = True


ALGOS = [("sd3", "ctrl", ""), ("flux", "ctrl", ""), ("sd3", "ddpo", ""), ("flux", "dpok", ""), ("sd3", "ctrl", "b"),
         ("flux", "reward-backprop", "diff"), ("sd3", "diffusion-dpo", ""), ("flux", "ddpo", ""),
         ("sd3", "dpok", "bf16"), ("flux", "ctrl", "b"), ("sd3", "reward-backprop", "diff"),
         ("flux", "diffusion-dpo", ""), ("sd3", "ddpo-sf", ""), ("flux", "ddpo-sf", ""),
         ("sd3", "adjoint-matching", "diff"), ("flux", "flow-grpo", ""), ("sd3", "diffusion-nft", "")]


@pytest.mark.parametrize("kind,algo,extra", ALGOS)
def test_one_update_changes_only_the_lora_weights(pipes, tmp_path, kind, algo, extra):
    kw, reward = {}, None
    if extra == "b":
        kw, reward = dict(ctrl=dict(estimator="b", value=dict(epochs=1, reward_term="true"))), brightness
    elif extra == "diff":
        reward = brightness
    elif extra == "bf16":  # frozen weights in bf16 + autocast, trainable LoRA in fp32, gradient checkpointing
        kw["diffusers"] = dict(prompts=_prompt_file(tmp_path), lora_rank=2, resolution=RES, max_sequence_length=16,
                               dtype="bf16", gradient_checkpointing=True)
    if algo == "diffusion-dpo":
        kw["batch_size"] = 8
    if algo in ("flow-grpo", "diffusion-nft"):  # groups of 2 rollouts per prompt
        kw[algo.replace("-", "_")] = dict(group_size=2)
    tr = Trainer(_cfg(pipes[kind], algo, _prompt_file(tmp_path), kind, **kw), reward=reward)
    assert tr.cfg.sampler.solver == "ddim" and tr.cfg.sampler.eta == 1.0  # the flow families' rollout default
    rec, before, changed = one_step(tr)
    assert changed, "nothing was trained"
    assert all(".lora_" in k for k in changed), sorted(k for k in changed if ".lora_" not in k)[:3]
    assert any(".lora_B." in k for k in changed) and rec["reward_queries"] >= 4
    if extra == "bf16":
        net = tr.task.backend.net
        assert net.is_gradient_checkpointing and all(p.dtype == torch.float32 for p in tr.task.trainable)
        assert any(p.dtype == torch.bfloat16 for p in net.parameters() if not p.requires_grad)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_lora_roundtrip_with_plain_diffusers(pipes, tmp_path, kind):
    import diffusers

    out = tmp_path / "run"
    cfg = _cfg(pipes[kind], "ddpo", _prompt_file(tmp_path), kind, epochs=2, optim=dict(lr=5e-2, minibatch=6),
               diffusers=dict(prompts=_prompt_file(tmp_path), lora_rank=2, lora_alpha=6.0, resolution=RES,
                              max_sequence_length=16))
    tr = Trainer(cfg, out)
    tr.train()
    lora = out / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.is_file()
    m = tr.task.backend
    K = 4
    x = torch.randn(2, *tr.task.sample_shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = ode_euler(with_guidance(tr.task.model, GUIDANCE[kind]), x, tr.process.time_grid(K), tr.process,
                         torch.tensor([0, 1]))
        x0 = tr.process.convert(ours.outputs[:, K - 1], "eps", "x0", ours.times[K - 1].expand(2), ours.states[:, K - 1])
    cls = diffusers.StableDiffusion3Pipeline if kind == "sd3" else diffusers.FluxPipeline
    pipe = cls.from_pretrained(str(pipes[kind]))
    pipe.set_progress_bar_config(disable=True)
    fresh = type("M", (), {"pipe": pipe, "process": m.process, "model": m.model})
    with torch.no_grad():
        plain = _pipe_call(fresh, kind, x, K, PROMPTS[:2], GUIDANCE[kind], [])
        pipe.load_lora_weights(str(out / "lora"))
        tuned = _pipe_call(fresh, kind, x, K, PROMPTS[:2], GUIDANCE[kind], [])
    scale = tuned.abs().max()
    assert float((plain - tuned).abs().max() / scale) > 1e-3, "the LoRA changed nothing"
    assert float((x0 - tuned).abs().max() / scale) < 1e-4


def test_bad_input_gives_one_line_errors(pipes, tmp_path):
    prompts = _prompt_file(tmp_path)
    with pytest.raises(CtrlDiffError, match="guidance-distilled") as e:
        Trainer(_cfg(pipes["flux"], "ddpo", prompts, "flux", sampler=dict(steps=3, guidance=3.0)))
    assert "\n" not in str(e.value)
    m = _load(pipes["flux"])
    with pytest.raises(CtrlDiffError, match="no classifier-free guidance"):
        with_guidance(m.model, 2.0)
    with pytest.raises(CtrlDiffError, match="'em' is unstable on a flow-matching pipeline") as e:
        Trainer(_cfg(pipes["sd3"], "ddpo", prompts, "sd3", sampler=dict(solver="em", steps=3, guidance=3.0)))
    assert "\n" not in str(e.value)
    with pytest.raises(CtrlDiffError, match="multiple of 4 for this SD3"):
        load_diffusers_model(str(pipes["sd3"]), PROMPTS, DiffusersConfig(resolution=18))


def test_prompt_cache_and_dropping_the_text_encoders(pipes, tmp_path):
    cache = tmp_path / "emb.pt"
    a = _load(pipes["sd3"], prompt_cache=str(cache))
    assert cache.is_file()
    b = _load(pipes["sd3"], prompt_cache=str(cache), free_text_encoders=True)
    assert b.pipe.text_encoder_3 is None and b.prompt_emb.encode_fn is None
    idx = torch.tensor([0, 1, 2, 3])
    ea, pa = a.prompt_emb.lookup(idx, 4)
    eb, pb = b.prompt_emb.lookup(idx, 4)
    assert torch.equal(ea, eb) and torch.equal(pa, pb)


def test_gpu_flow_lora_benchmark_cpu_dry_run():
    """benchmarks/gpu_flow_lora.py --cpu: the SD3.5-Medium benchmark's code path (in-memory pipeline, prompt cache,
    dropped text encoders, bf16-ready LoRA CTRL epoch) at tiny widths."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_flow_lora.py"
    spec = importlib.util.spec_from_file_location("gpu_flow_lora", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--cpu", "--no-write", "--max-sequence-length", "16", "--batch", "2", "--steps", "2"])
    assert out["cpu_dry_run"] and out["updates"] == 1 and out["epoch_s"] > 0 and out["lora_parameters"] > 0
    assert out["latent_shape"] == [4, 8, 8] and out["shift"] == 3.0
    assert mod.SD35M_TRANSFORMER["num_layers"] == 24 and mod.SD35M_TRANSFORMER["joint_attention_dim"] == 4096
