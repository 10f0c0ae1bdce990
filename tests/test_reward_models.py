"""Model rewards (aesthetic, ImageReward, PickScore, HPSv2, CLIPScore): each loader reads tiny random weights written
in the layout it expects (transformers save_pretrained directories, the aesthetic head's .pth, an open_clip state
dict, an ImageReward checkpoint, tokenizers from a tiny vocab) through its real loading path, and scores a batch.
Known answers come from transformers' own forward passes, torch's nn.MultiheadAttention and the PIL CLIP
preprocessing; no weights are downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ctrldiff.errors import CtrlDiffError
from ctrldiff.rewards import make_reward

transformers = pytest.importorskip("transformers", reason="the model rewards need transformers (extra 'rewards')")
from transformers import BertTokenizer, CLIPConfig, CLIPModel, CLIPTokenizer  # noqa: E402

from ctrldiff.rewards.models.common import CLIP_MEAN, CLIP_STD, MLPHead, preprocess_images  # noqa: E402

WORDS = ["a", "cat", "dog", "red", "photo", "of", "the"]
PROMPTS = ["a photo of a cat", "the red dog", "a dog", "cat"]


# ---- tiny weights in the layouts the loaders read ----------------------------------------------------------------
def _write_clip_tokenizer(d: Path) -> dict:
    vocab: dict[str, int] = {}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c + "</w>"] = len(vocab)
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab


def _tiny_clip(d: Path, projection_dim: int = 16, act: str = "quick_gelu", image_size: int = 16) -> CLIPModel:
    vocab = _write_clip_tokenizer(d)
    eos = vocab["<|endoftext|>"]
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=12, eos_token_id=eos, bos_token_id=eos - 1, pad_token_id=eos, hidden_act=act)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8, hidden_act=act)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
    model.logit_scale.data.fill_(2.0)
    model.eval()
    model.save_pretrained(d)
    return model


@pytest.fixture(autouse=True)
def _errors_are_one_line(monkeypatch):
    """Every CtrlDiffError a model reward raises in these tests is one line (the CLI prints it as ``error: ...``)."""
    real = CtrlDiffError.__init__

    def init(self, *args):
        assert all("\n" not in str(a) for a in args), args
        real(self, *args)

    monkeypatch.setattr(CtrlDiffError, "__init__", init)


def _images(b: int = 4, size: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def _check_scores(reward, x, cond):
    r1, r2 = reward(x, cond), reward(x, cond)
    assert r1.shape == (x.shape[0],) and torch.isfinite(r1).all()
    assert torch.equal(r1, r2)  # deterministic (eval mode: no dropout)
    assert reward.differentiable
    xg = x.clone().requires_grad_(True)
    reward(xg, cond).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    assert all(p.grad is None for m in reward.modules for p in m.parameters())  # the reward model stays frozen
    return r1


# ---- preprocessing ------------------------------------------------------------------------------------------------
def test_preprocessing_matches_clip_image_processor():
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    rng = np.random.default_rng(0)
    same = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)  # already 16 x 16: normalisation only
    ref = proc(images=list(same), return_tensors="pt")["pixel_values"]
    x = torch.from_numpy(same).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(preprocess_images(x, 16), ref, atol=1e-5, rtol=0)
    # a smooth 40 x 32 image: shorter side resized to 16 (bicubic), center crop 16 x 16
    yy, xx = np.meshgrid(np.linspace(0, 1, 40), np.linspace(0, 1, 32), indexing="ij")
    smooth = np.stack([yy, xx, (yy + xx) / 2], -1)
    smooth = (smooth * 255).round().astype(np.uint8)[None]
    ref = proc(images=list(smooth), return_tensors="pt")["pixel_values"]
    x = torch.from_numpy(smooth).permute(0, 3, 1, 2).float() / 127.5 - 1
    got = preprocess_images(x, 16)
    assert got.shape == ref.shape == (1, 3, 16, 16)
    assert (got - ref).abs().max() < 0.05  # PIL resamples in uint8; torch in float
    m = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess_images(torch.zeros(1, 1, 8, 8), 8), ((0.5 - m) / s).expand(1, 3, 8, 8))
    with pytest.raises(CtrlDiffError, match=r"expects images \[B, 3, H, W\]"):
        preprocess_images(torch.zeros(2, 5), 8)


# ---- aesthetic -------------------------------------------------------------------------------------------------------
def test_aesthetic_head_has_the_official_key_names():
    sd = MLPHead(768).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,), "layers.6.weight": (16, 64),
        "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,)}


def test_aesthetic_loads_head_pth_and_clip_dir(tmp_path):
    clip = _tiny_clip(tmp_path / "clip")
    torch.manual_seed(1)
    head = MLPHead(16).eval()
    torch.save(head.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    reward = make_reward(f"aesthetic:path={tmp_path}")
    assert reward.name == "aesthetic"
    x = _images()
    r = _check_scores(reward, x, None)
    with torch.no_grad():  # known answer: transformers' get_image_features, L2-normalised, through the head
        e = clip.get_image_features(pixel_values=preprocess_images(x, 16)).pooler_output
        expected = head(e / e.norm(dim=-1, keepdim=True))[:, 0]
    torch.testing.assert_close(r, expected)
    # the same head as .safetensors, CLIP given separately
    from safetensors.torch import save_file

    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))
    r2 = make_reward(f"aesthetic:head={tmp_path / 'head.safetensors'};clip={tmp_path / 'clip'}")(x, PROMPTS)
    torch.testing.assert_close(r2, r)


def test_aesthetic_errors_name_what_is_missing(tmp_path):
    _tiny_clip(tmp_path / "clip")
    with pytest.raises(CtrlDiffError, match="needs its weights"):
        make_reward("aesthetic")
    with pytest.raises(CtrlDiffError, match=r"weight file or directory .*nowhere not found"):
        make_reward(f"aesthetic:path={tmp_path / 'nowhere'}")
    with pytest.raises(CtrlDiffError, match=r"must hold sac\+logos\+ava1-l14-linearMSE.pth .*no weight file"):
        make_reward(f"aesthetic:path={tmp_path}")
    (tmp_path / "head.txt").write_text("hello")
    with pytest.raises(CtrlDiffError, match=r"head.txt is not a weight file"):
        make_reward(f"aesthetic:head={tmp_path / 'head.txt'};clip={tmp_path / 'clip'}")
    (tmp_path / "bad.pth").write_bytes(b"not a pickle")
    with pytest.raises(CtrlDiffError, match=r"cannot read weight file .*bad.pth"):
        make_reward(f"aesthetic:head={tmp_path / 'bad.pth'};clip={tmp_path / 'clip'}")
    torch.save({"fc.weight": torch.zeros(1, 16)}, tmp_path / "other.pth")
    with pytest.raises(CtrlDiffError, match=r"does not fit the model: missing layers.0.weight.*unexpected fc.weight"):
        make_reward(f"aesthetic:head={tmp_path / 'other.pth'};clip={tmp_path / 'clip'}")
    torch.save(MLPHead(768).state_dict(), tmp_path / "wide.pth")  # the real head on a CLIP with other widths
    with pytest.raises(CtrlDiffError, match=r"wrong shape layers.0.weight \(1024, 768\) \(expected \(1024, 16\)\)"):
        make_reward(f"aesthetic:head={tmp_path / 'wide.pth'};clip={tmp_path / 'clip'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CtrlDiffError, match=r"\(CLIP model\): cannot load CLIPModel from .*empty"):
        make_reward(f"aesthetic:head={tmp_path / 'wide.pth'};clip={tmp_path / 'empty'}")
    with pytest.raises(CtrlDiffError, match=r"bad arguments .*takes: path, head, clip"):
        make_reward(f"aesthetic:path={tmp_path};colour=red")


# ---- PickScore / CLIPScore ---------------------------------------------------------------------------------------
def test_pickscore_and_clipscore_match_clipmodel(tmp_path):
    clip = _tiny_clip(tmp_path / "m")
    x = _images()
    tok = CLIPTokenizer.from_pretrained(tmp_path / "m")
    inp = tok(PROMPTS, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = clip(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                   pixel_values=preprocess_images(x, 16))
    logits = out.logits_per_image.diagonal()  # exp(logit_scale) * cos(image i, text i)
    pick = make_reward(f"pickscore:model={tmp_path / 'm'}")
    assert pick.name == "pickscore"
    torch.testing.assert_close(_check_scores(pick, x, PROMPTS), logits)
    cs = make_reward(f"clipscore:{tmp_path / 'm'};w=2.5")
    xc = _images(seed=2)  # images whose cosines with the prompts have both signs: both branches of max(cos, 0)
    with torch.no_grad():
        cos = clip(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                   pixel_values=preprocess_images(xc, 16)).logits_per_image.diagonal() / clip.logit_scale.exp()
    assert (cos < 0).any() and (cos > 0).any()
    torch.testing.assert_close(_check_scores(cs, xc, PROMPTS), 2.5 * cos.clamp(min=0))
    # a tokenizer given separately (PickScore's processor comes from another repository)
    _write_clip_tokenizer(tmp_path / "tok")
    for f in ("vocab.json", "merges.txt"):
        (tmp_path / "m" / f).unlink()
    pick2 = make_reward(f"pickscore:model={tmp_path / 'm'};tokenizer={tmp_path / 'tok'}")
    torch.testing.assert_close(pick2(x, PROMPTS), logits)


def test_text_image_rewards_need_prompts(tmp_path):
    _tiny_clip(tmp_path / "m")
    pick = make_reward(f"pickscore:model={tmp_path / 'm'}")
    x = _images(2)
    for cond, msg in [(None, "got none"), (torch.tensor([1, 2]), "got a tensor of shape"), (["one"], "1 prompts for 2"),
                      ([1, 2], "got list")]:
        with pytest.raises(CtrlDiffError, match=msg):
            pick(x, cond)


def test_hub_ids_fail_fast_offline_or_unreachable(tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CTRLDIFF_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(CtrlDiffError, match=r"'nobody/no-such-model' is not a local directory nor in the Hugging "
                                            r"Face cache, and hub downloads are switched off"):
        make_reward("pickscore:model=nobody/no-such-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import socket

    with socket.socket() as s:  # a port with nobody listening: the hub endpoint cannot be reached
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(CtrlDiffError, match=rf"clipscore.*'nobody/no-such-model'.*http://127.0.0.1:{port} cannot be "
                                            "reached"):
        make_reward("clipscore:model=nobody/no-such-model")
    assert time.perf_counter() - t0 < 10
    with pytest.raises(CtrlDiffError, match=r"no/such/dir does not exist"):
        make_reward("clipscore:model=./no/such/dir")


# ---- HPSv2: an open_clip state dict ----------------------------------------------------------------------------
def _to_openclip(model: CLIPModel) -> dict[str, torch.Tensor]:
    """Written independently of the loader: transformers CLIPModel -> open_clip key layout."""
    sd = model.state_dict()
    out = {"visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
           "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
           "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
           "visual.proj": sd["visual_projection.weight"].t(),
           "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "text_projection": sd["text_projection.weight"].t(), "logit_scale": sd["logit_scale"]}
    for a, b in [("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                 ("ln_final", "text_model.final_layer_norm")]:
        for p in ("weight", "bias"):
            out[f"{a}.{p}"] = sd[f"{b}.{p}"]
    for tower, oc in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        for i in range(2):
            h, o = f"{tower}.encoder.layers.{i}.", f"{oc}.resblocks.{i}."
            for p in ("weight", "bias"):
                out[o + f"attn.in_proj_{p}"] = torch.cat([sd[h + f"self_attn.{n}_proj.{p}"] for n in "qkv"])
                for a, b in [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]:
                    out[o + f"{a}.{p}"] = sd[h + f"{b}.{p}"]
    return {k: v.clone() for k, v in out.items()}


def test_openclip_attention_maps_onto_clip_attention():
    """open_clip blocks use nn.MultiheadAttention: its in_proj (q; k; v) and out_proj must give the same attention."""
    from transformers.models.clip.modeling_clip import CLIPAttention

    from ctrldiff.rewards.models.clip import openclip_to_hf

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    cfg = CLIPConfig(vision_config=dict(hidden_size=32, num_attention_heads=4)).vision_config
    attn = CLIPAttention(cfg).eval()
    sd = openclip_to_hf({f"visual.transformer.resblocks.0.attn.{k}": v for k, v in mha.state_dict().items()})
    attn.load_state_dict({k.split("self_attn.")[1]: v for k, v in sd.items()})
    h = torch.randn(3, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(h)[0], mha(h, h, h, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def test_hpsv2_converts_an_openclip_checkpoint(tmp_path):
    clip = _tiny_clip(tmp_path / "base", act="gelu")
    torch.save({"state_dict": _to_openclip(clip), "epoch": 1}, tmp_path / "HPS_v2_compressed.pt")
    hps = make_reward(f"hpsv2:path={tmp_path};base={tmp_path / 'base'}")
    assert hps.name == "hpsv2"
    x = _images()
    tok = CLIPTokenizer.from_pretrained(tmp_path / "base")
    inp = tok(PROMPTS, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = clip(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                   pixel_values=preprocess_images(x, 16))
    torch.testing.assert_close(_check_scores(hps, x, PROMPTS), out.logits_per_image.diagonal() / clip.logit_scale.exp())
    sd = _to_openclip(clip)
    del sd["visual.proj"]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(CtrlDiffError, match=r"broken.pt does not fit the model: missing visual_projection.weight"):
        make_reward(f"hpsv2:path={tmp_path / 'broken.pt'};base={tmp_path / 'base'}")
    with pytest.raises(CtrlDiffError, match="needs its checkpoint"):
        make_reward("hpsv2")


# ---- ImageReward -------------------------------------------------------------------------------------------------
def _vit_block_reference(blk: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """BLIP's timm-style ViT block, written out: x + proj(attn(norm1 x)); x + fc2(gelu(fc1(norm2 x)))."""
    F = torch.nn.functional
    b, n, d = x.shape
    h = F.layer_norm(x, (d,), blk["norm1.weight"], blk["norm1.bias"], eps=1e-6)
    qkv = F.linear(h, blk["attn.qkv.weight"], blk["attn.qkv.bias"]).reshape(b, n, 3, heads, d // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    a = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)
    x = x + F.linear((a @ v).transpose(1, 2).reshape(b, n, d), blk["attn.proj.weight"], blk["attn.proj.bias"])
    h = F.layer_norm(x, (d,), blk["norm2.weight"], blk["norm2.bias"], eps=1e-6)
    return x + F.linear(F.gelu(F.linear(h, blk["mlp.fc1.weight"], blk["mlp.fc1.bias"])), blk["mlp.fc2.weight"],
                        blk["mlp.fc2.bias"])


def _imagereward_checkpoint(d: Path) -> tuple[dict, BertTokenizer]:
    """A tiny ImageReward.pt in the official layout (blip.visual_encoder.* timm ViT, blip.text_encoder.* med.py
    BERT, mlp.layers.*, plus the unused projections), med_config.json and vocab.txt."""
    from transformers import BlipTextConfig, BlipTextModel

    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizer.from_pretrained(d)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    width, patch, grid, depth = 128, 8, 2, 2  # 2 heads of 64 (BLIP's ViTs: heads = width / 64)
    sd = {"blip.visual_encoder.cls_token": rnd(1, 1, width), "blip.visual_encoder.pos_embed": rnd(1, grid * grid + 1, width),
          "blip.visual_encoder.patch_embed.proj.weight": rnd(width, 3, patch, patch),
          "blip.visual_encoder.patch_embed.proj.bias": rnd(width),
          "blip.visual_encoder.norm.weight": 1 + rnd(width), "blip.visual_encoder.norm.bias": rnd(width),
          "blip.vision_proj.weight": rnd(8, width), "blip.vision_proj.bias": rnd(8),
          "blip.text_proj.weight": rnd(8, 24), "blip.text_proj.bias": rnd(8)}
    for i in range(depth):
        p = f"blip.visual_encoder.blocks.{i}."
        sd |= {p + "norm1.weight": 1 + rnd(width), p + "norm1.bias": rnd(width), p + "norm2.weight": 1 + rnd(width),
               p + "norm2.bias": rnd(width), p + "attn.qkv.weight": rnd(3 * width, width),
               p + "attn.qkv.bias": rnd(3 * width),
               p + "attn.proj.weight": rnd(width, width), p + "attn.proj.bias": rnd(width),
               p + "mlp.fc1.weight": rnd(4 * width, width), p + "mlp.fc1.bias": rnd(4 * width),
               p + "mlp.fc2.weight": rnd(width, 4 * width), p + "mlp.fc2.bias": rnd(width)}
    torch.manual_seed(0)
    text = BlipTextModel(BlipTextConfig(vocab_size=len(tok), hidden_size=24, encoder_hidden_size=width,
                                        intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                                        max_position_embeddings=40, is_decoder=True), add_pooling_layer=False)
    sd |= {"blip.text_encoder." + k: v for k, v in text.state_dict().items()}
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    head = MLPHead(24)
    sd |= {"mlp." + k: v for k, v in head.state_dict().items()}
    torch.save(sd, d / "ImageReward.pt")
    (d / "med_config.json").write_text(json.dumps({"hidden_size": 24, "num_attention_heads": 2, "layer_norm_eps": 1e-12,
                                                   "hidden_act": "gelu", "add_cross_attention": True}))
    return sd, tok


def test_imagereward_loads_the_official_layout(tmp_path):
    sd, tok = _imagereward_checkpoint(tmp_path / "ir")
    reward = make_reward(f"imagereward:path={tmp_path / 'ir'}")
    assert reward.name == "imagereward"
    model = reward.model
    assert model.vision.config.image_size == 16 and model.vision.config.num_attention_heads == 2
    x = _images(3, size=16)
    prompts = PROMPTS[:3]
    r = _check_scores(reward, x, prompts)
    # known answer, written from the checkpoint tensors: the ViT by hand, then the text encoder + MLP
    vit = {k[len("blip.visual_encoder."):]: v for k, v in sd.items() if k.startswith("blip.visual_encoder.")}
    px = preprocess_images(x, 16)
    with torch.no_grad():
        h = torch.nn.functional.conv2d(px, vit["patch_embed.proj.weight"], vit["patch_embed.proj.bias"], stride=8)
        h = torch.cat([vit["cls_token"].expand(3, -1, -1), h.flatten(2).transpose(1, 2)], 1) + vit["pos_embed"]
        heads = model.vision.config.num_attention_heads
        for i in range(2):
            h = _vit_block_reference({k[len(f"blocks.{i}."):]: v for k, v in vit.items() if k.startswith(f"blocks.{i}.")},
                                     h, heads)
        h = torch.nn.functional.layer_norm(h, (128,), vit["norm.weight"], vit["norm.bias"], eps=1e-6)
        torch.testing.assert_close(model.vision(pixel_values=px).last_hidden_state, h, atol=1e-5, rtol=1e-5)
        t = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        out = model.text(input_ids=t["input_ids"], attention_mask=t["attention_mask"], encoder_hidden_states=h,
                         encoder_attention_mask=torch.ones(h.shape[:2], dtype=torch.long), is_decoder=False)
        head = MLPHead(24).eval()
        head.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("mlp.")})
        expected = (head(out.last_hidden_state[:, 0])[:, 0] - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(r, expected)
    # prompts matter (cross-attention reads the image; the text changes the score)
    assert not torch.allclose(reward(x, ["cat", "cat", "cat"]), reward(x, ["the red dog"] * 3))


def test_imagereward_errors(tmp_path):
    sd, _ = _imagereward_checkpoint(tmp_path / "ir")
    with pytest.raises(CtrlDiffError, match="needs its weights"):
        make_reward("imagereward")
    bad = {k: v for k, v in sd.items() if k != "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"}
    torch.save(bad, tmp_path / "ir" / "ImageReward.pt")
    with pytest.raises(CtrlDiffError, match=r"does not fit the model: missing text.encoder.layer.1.crossattention"):
        make_reward(f"imagereward:path={tmp_path / 'ir'}")
    torch.save({"x": torch.zeros(1)}, tmp_path / "ir" / "ImageReward.pt")
    with pytest.raises(CtrlDiffError, match=r"checkpoint has no 'blip.visual_encoder.cls_token'; is it ImageReward.pt"):
        make_reward(f"imagereward:path={tmp_path / 'ir'}")
    with pytest.raises(CtrlDiffError, match=r"imagereward.*not found"):
        make_reward(f"imagereward:{tmp_path / 'missing'}")


# ---- importing costs nothing -----------------------------------------------------------------------------------------
def test_importing_rewards_does_not_import_transformers():
    code = ("import sys\nfrom ctrldiff.rewards import available, make_reward\n"
            "names = available()\nassert {'aesthetic', 'imagereward', 'pickscore', 'hpsv2', 'clipscore', 'remote'} <= "
            "set(names), names\nmake_reward('toy2d-quadratic'); make_reward('remote:http://127.0.0.1:1')\n"
            "import ctrldiff.rewards.models.common, ctrldiff.rewards.server\n"
            "heavy = [m for m in ('transformers', 'huggingface_hub') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
