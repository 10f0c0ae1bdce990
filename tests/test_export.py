"""``ctrldiff export`` of a LoRA run on the tiny SD 1.5 pipeline: a hub-ready folder that plain diffusers loads."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

pytest.importorskip("diffusers", reason="the diffusers extra (pip install 'ctrldiff[diffusers]') is not installed")
pytest.importorskip("peft", reason="the diffusers extra (pip install 'ctrldiff[diffusers]') is not installed")

from ctrldiff.cli import main  # noqa: E402
from ctrldiff.models.diffusers_tiny import save_tiny_pipeline  # noqa: E402
from ctrldiff.train.config import TrainConfig  # noqa: E402
from ctrldiff.train.trainer import Trainer  # noqa: E402


def test_export_lora_run_loads_in_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    base = save_tiny_pipeline(tmp_path / "sd15", "sd15")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("cat\ndog\n")
    run = tmp_path / "run"
    cfg = TrainConfig(algo="ddpo", model=str(base), reward="jpeg-compressibility", beta=0.1, epochs=1, batch_size=4,
                      sampler=dict(solver="ddim", eta=1.0, steps=3, guidance=2.0), optim=dict(lr=5e-2, minibatch=6),
                      log=dict(progress=False, trackers=[], num_final_eval=2, num_eval_samples=2),
                      diffusers=dict(prompts=str(prompts), lora_rank=2))
    Trainer(cfg, run).train()
    out = tmp_path / "hub"
    r = CliRunner().invoke(main, ["export", str(run), "--out", str(out), "--base-model", "me/tiny-sd15"])
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.iterdir()} >= {"pytorch_lora_weights.safetensors", "README.md", "before_after.png",
                                               "config.yaml", "final_eval.json", "reward_curve.png"}
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "me/tiny-sd15" and front["library_name"] == "diffusers"
    assert {"lora", "ddpo", "diffusers", "text-to-image"} <= set(front["tags"])
    fe = json.loads((run / "final_eval.json").read_text())
    assert f"**{fe['after']['objective']:.4f}**" in card and "jpeg-compressibility" in card and "| beta" in card
    assert "pipe.load_lora_weights" in card and "rank 2" in card
    # plain diffusers loads the exported folder and samples what the run's own LoRA samples
    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    x = torch.randn(1, 4, pipe.unet.config.sample_size, pipe.unet.config.sample_size,
                    generator=torch.Generator().manual_seed(0))
    kw = dict(prompt=["cat"], num_inference_steps=2, guidance_scale=2.0, eta=0.0, output_type="latent")
    with torch.no_grad():
        pipe.load_lora_weights(str(out), adapter_name="exported")
        exported = pipe(latents=x.clone(), **kw).images
        pipe.delete_adapters("exported")
        pipe.load_lora_weights(str(run / "lora"), adapter_name="run")
        own = pipe(latents=x.clone(), **kw).images
    assert torch.equal(exported, own)
    # without --base-model the card names the run's model and the CLI says it is not a hub id
    r = CliRunner().invoke(main, ["export", str(run), "--out", str(out), "--overwrite"])
    assert r.exit_code == 0 and "is not a hub id" in r.output
    assert yaml.safe_load((out / "README.md").read_text().split("---")[1])["base_model"] == str(base)
