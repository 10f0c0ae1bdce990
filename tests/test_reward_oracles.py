"""The model rewards against their ORIGINAL implementations, with small random weights built offline.

Each original model is built by its own package in its own layout (open_clip / HPSv2's vendored open_clip, OpenAI's
``clip`` + the LAION aesthetic MLP, transformers' CLIPModel for PickScore), with tiny widths and random weights;
its weights go through ctrldiff's loaders and converters (``ctrldiff.rewards.models``) and both score the same
images and prompts. Tokenizers are built offline from the BPE merges the original packages ship.

Images are given at the model's input size, so the originals' PIL/torchvision resize is the identity and the
comparison is of the models, their weight layouts, pooling and score formulas (ctrldiff's own batched torch
preprocessing is tested against torchvision in test_reward_models.py).

The original packages are optional (they need a torchvision built for the installed torch): without them these
tests skip, naming the package and the import error. ``pip install open_clip_torch hpsv2 image-reward`` (with
``--no-deps`` and their small dependencies ftfy, timm, clint, fairscale next to an existing torch/torchvision).
"""

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the rewards extra (transformers) is not installed")
from PIL import Image  # noqa: E402

from ctrldiff.rewards.models.clip import load_clipscore, load_hpsv2, load_pickscore, openclip_to_hf  # noqa: E402

PROMPTS = ["a photo of a cat", "an oil painting of a harbour at night", "two dogs", "a red bicycle"]


def original(module: str):
    """Import an original package, or skip the test with the reason."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - not installed, or its torchvision does not load, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        pytest.skip(f"original package {module!r} cannot be imported here: {type(e).__name__}: {first}")


def _images(n: int, size: int, seed: int = 0) -> tuple[list[Image.Image], torch.Tensor]:
    """n random RGB images at ``size`` px: as PIL images (for the originals) and as ctrldiff's input [n, 3, S, S]
    in [-1, 1] (the same 8-bit pixels)."""
    u8 = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).double() / 127.5 - 1
    return [Image.fromarray(a) for a in u8], x.float()


def _hf_tokenizer_dir(simple_tokenizer, out: Path) -> Path:
    """A transformers CLIPTokenizer with exactly the ids of an original SimpleTokenizer (its BPE vocabulary and
    merges; the special tokens under their OpenAI names)."""
    from transformers import CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    enc = dict(simple_tokenizer.encoder)
    specials = sorted((i, t) for t, i in enc.items() if i >= len(enc) - 2)
    for (i, t), name in zip(specials, ("<|startoftext|>", "<|endoftext|>"), strict=True):
        del enc[t]
        enc[name] = i
    (out / "vocab.json").write_text(json.dumps(enc))
    merges = sorted(simple_tokenizer.bpe_ranks, key=simple_tokenizer.bpe_ranks.get)
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77).save_pretrained(out)
    return out


def _hf_config(*, embed: int, v_width: int, v_layers: int, v_heads: int, patch: int, size: int, t_width: int,
               t_layers: int, t_heads: int, act: str, vocab: int = 49408):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=t_width, intermediate_size=4 * t_width,
                         num_hidden_layers=t_layers, num_attention_heads=t_heads, max_position_embeddings=77,
                         hidden_act=act, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=v_width, intermediate_size=4 * v_width, num_hidden_layers=v_layers,
                           num_attention_heads=v_heads, image_size=size, patch_size=patch, hidden_act=act),
        projection_dim=embed)


TINY = dict(embed=24, v_width=64, v_layers=2, v_heads=4, patch=8, size=32, t_width=32, t_layers=2, t_heads=4)


def _open_clip_model(oc, quick_gelu: bool):
    """A tiny open_clip CLIP (ViT image tower, standard text tower) with random weights (``oc``: open_clip or the
    HPSv2 package's vendored copy)."""
    torch.manual_seed(0)
    m = oc.model.CLIP(TINY["embed"], oc.model.CLIPVisionCfg(layers=TINY["v_layers"], width=TINY["v_width"],
                                                           head_width=TINY["v_width"] // TINY["v_heads"],
                                                           patch_size=TINY["patch"], image_size=TINY["size"]),
                      oc.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=TINY["t_width"],
                                           heads=TINY["t_heads"], layers=TINY["t_layers"]), quick_gelu=quick_gelu)
    with torch.no_grad():  # open_clip zero-initialises nothing we need; make every weight count
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m.eval()


def _save_hf_clip(sd_openclip: dict, act: str, tok_dir: Path, out: Path, **config) -> Path:
    """The open_clip-layout state dict through ctrldiff's converter into a CLIPModel directory (for the loaders
    that take a transformers model: aesthetic, PickScore, CLIPScore)."""
    from transformers import CLIPModel

    model = CLIPModel(_hf_config(act=act, **(TINY | config)))
    missing, unexpected = model.load_state_dict(openclip_to_hf(sd_openclip), strict=False)
    assert not unexpected and set(missing) <= {"text_model.embeddings.position_ids",
                                               "vision_model.embeddings.position_ids"}, (missing, unexpected)
    model.save_pretrained(out)
    for f in tok_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _close(ours: torch.Tensor, theirs: torch.Tensor, tol: float = 1e-4) -> None:
    scale = max(1.0, float(theirs.abs().max()))
    assert float((ours.double() - theirs.double()).abs().max()) <= tol * scale, (ours, theirs)


# ---- HPSv2: the hpsv2 package's own open_clip ----------------------------------------------------------------
def test_hpsv2_oracle(tmp_path):
    oc = original("hpsv2.src.open_clip")
    model = _open_clip_model(oc, quick_gelu=False)  # ViT-H-14 is a GELU model
    torch.save({"state_dict": model.state_dict()}, tmp_path / "HPS_v2_compressed.pt")
    base = tmp_path / "base"
    _hf_config(act="gelu", **TINY).save_pretrained(base)
    _hf_tokenizer_dir(oc.tokenizer.SimpleTokenizer(), base)
    pil, x = _images(len(PROMPTS), TINY["size"])
    preprocess = oc.transform.image_transform(TINY["size"], is_train=False)
    with torch.no_grad():  # hpsv2.img_score.score: diag(image_features @ text_features.T) of the model's output
        out = model(torch.stack([preprocess(im) for im in pil]), oc.tokenize(PROMPTS))
        img, txt = out[:2] if isinstance(out, tuple) else (out["image_features"], out["text_features"])
        theirs = torch.diagonal(img @ txt.T)
        ours = load_hpsv2(str(tmp_path), base=str(base))(x, PROMPTS)
    _close(ours, theirs)


# ---- CLIPScore: open_clip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("quick_gelu", [True, False], ids=["openai-quickgelu", "laion-gelu"])
def test_clipscore_oracle(tmp_path, quick_gelu):
    oc = original("open_clip")
    model = _open_clip_model(oc, quick_gelu=quick_gelu)
    tok = _hf_tokenizer_dir(oc.tokenizer.SimpleTokenizer(), tmp_path / "tok")
    d = _save_hf_clip(model.state_dict(), "quick_gelu" if quick_gelu else "gelu", tok, tmp_path / "clip")
    pil, x = _images(len(PROMPTS), TINY["size"], seed=1)
    preprocess = oc.image_transform(TINY["size"], is_train=False)
    with torch.no_grad():  # Hessel et al.: CLIP-S = w max(cos(E_img, E_txt), 0), w = 2.5
        img = model.encode_image(torch.stack([preprocess(im) for im in pil]), normalize=True)
        txt = model.encode_text(oc.tokenize(PROMPTS), normalize=True)
        cos = (img * txt).sum(-1)
        theirs = 2.5 * torch.clamp(cos, min=0)
        reward = load_clipscore(str(d))
        ours = reward(x, PROMPTS)
        ours_img, ours_txt = reward.features(x, PROMPTS)
    _close(ours, theirs)
    _close((ours_img * ours_txt).sum(-1), cos)  # before the clamp too (random weights: cos may be < 0 for all)


# ---- PickScore: transformers' CLIPModel, as the PickScore README scores -----------------------------------------
def test_pickscore_oracle(tmp_path):
    oc = original("open_clip")  # for the CLIP BPE tokenizer files only
    from transformers import CLIPImageProcessor, CLIPModel

    tok = _hf_tokenizer_dir(oc.tokenizer.SimpleTokenizer(), tmp_path / "tok")
    d = _save_hf_clip(_open_clip_model(oc, quick_gelu=False).state_dict(), "gelu", tok, tmp_path / "pick")
    CLIPImageProcessor(size={"shortest_edge": TINY["size"]}, crop_size=TINY["size"]).save_pretrained(d)
    model = CLIPModel.from_pretrained(d).eval()
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(d)
    pil, x = _images(len(PROMPTS), TINY["size"], seed=2)
    with torch.no_grad():  # github.com/yuvalkirstain/PickScore: logit_scale.exp() * text_embs @ image_embs.T
        img_in = processor(images=pil, return_tensors="pt")
        txt_in = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = model.get_image_features(**img_in)
        txt = model.get_text_features(**txt_in)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        theirs = torch.diagonal(model.logit_scale.exp() * txt @ img.T)
        ours = load_pickscore(str(d))(x, PROMPTS)
    _close(ours, theirs)


# ---- the LAION aesthetic predictor: OpenAI's clip + the improved-aesthetic-predictor MLP ---------------------
def _laion_mlp_class():
    """The MLP of improved-aesthetic-predictor as the image-reward package ships it (ImageReward/models/
    AestheticScore.py), loaded from its file alone (the package's __init__ pulls in BLIP, diffusers training, ...)."""
    spec = importlib.util.find_spec("ImageReward")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("original package 'image-reward' (ImageReward/models/AestheticScore.py) is not installed")
    original("clip")  # AestheticScore.py imports OpenAI's clip
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "AestheticScore.py"
    s = importlib.util.spec_from_file_location("_imagereward_aesthetic_score", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod.MLP


def test_aesthetic_oracle(tmp_path):
    clip = original("clip")
    MLP = _laion_mlp_class()
    from ctrldiff.rewards.models.aesthetic import load_aesthetic

    torch.manual_seed(0)
    cm = clip.model.CLIP(embed_dim=TINY["embed"], image_resolution=TINY["size"], vision_layers=TINY["v_layers"],
                         vision_width=TINY["v_width"], vision_patch_size=TINY["patch"], context_length=77,
                         vocab_size=49408, transformer_width=TINY["t_width"], transformer_heads=TINY["t_heads"],
                         transformer_layers=TINY["t_layers"]).float().eval()
    head = MLP(TINY["embed"]).eval()
    with torch.no_grad():  # larger than torch's default init, so that the scores differ between images
        for lin in head.layers:
            if isinstance(lin, torch.nn.Linear):
                lin.weight.normal_(0, lin.in_features ** -0.5)
                lin.bias.normal_(0, 0.1)
    torch.save(head.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    tok = _hf_tokenizer_dir(clip.simple_tokenizer.SimpleTokenizer(), tmp_path / "tok")
    # (OpenAI's CLIP gives its ViT width // 64 heads: 1 here)
    _save_hf_clip(cm.state_dict(), "quick_gelu", tok, tmp_path / "clip", v_heads=TINY["v_width"] // 64)
    pil, x = _images(5, TINY["size"], seed=3)
    preprocess = clip.clip._transform(TINY["size"])
    with torch.no_grad():  # simple_inference.py: MLP(normalized(model.encode_image(preprocess(image))))
        e = cm.encode_image(torch.stack([preprocess(im) for im in pil]))
        e = torch.from_numpy(e.numpy() / np.linalg.norm(e.numpy(), 2, axis=-1, keepdims=True))
        theirs = head(e.float())[:, 0]
        ours = load_aesthetic(str(tmp_path))(x)
    _close(ours, theirs)
    assert float(theirs.std()) > 1e-3


# ---- ImageReward: the image-reward package's BLIP (its ViT, its med.py BERT, its MLP and score()) -------------
def _import_imagereward():
    """ImageReward.ImageReward and its BLIP modules, imported without the package's __init__ (which also pulls in
    OpenAI's clip, diffusers training code, datasets, ...). Its med.py was written for transformers 4: three
    helpers it imports from transformers.modeling_utils are lent for the import only, and the two mask helpers of
    transformers 4's ModuleUtilsMixin it calls are given to its BertModel (written here; the model's own layers,
    attention and cross-attention are the package's)."""
    spec = importlib.util.find_spec("ImageReward")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("original package 'image-reward' is not installed")
    original("timm")
    original("fairscale")
    original("torchvision")
    import types

    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    root = Path(next(iter(spec.submodule_search_locations)))
    for name, path in (("ImageReward", root), ("ImageReward.models", root / "models")):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg

    def unavailable(*a, **k):
        raise NotImplementedError("head pruning is not used by ImageReward")

    lent = [n for n in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer")
            if not hasattr(mu, n)]
    for n in lent:
        setattr(mu, n, getattr(pu, n, unavailable))
    try:
        mods = [importlib.import_module(f"ImageReward.{m}") for m in ("ImageReward", "models.BLIP.med",
                                                                        "models.BLIP.vit", "models.BLIP.blip_pretrain")]
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"original package 'image-reward' cannot be imported here: {type(e).__name__}: {e}"[:300])
    finally:
        for n in lent:
            delattr(mu, n)
    bert = mods[1].BertModel
    if not hasattr(bert, "invert_attention_mask"):  # transformers >= 5 dropped these ModuleUtilsMixin helpers
        def invert_attention_mask(self, m):
            m = (m[:, None, :, :] if m.dim() == 3 else m[:, None, None, :]).to(self.dtype)
            return (1.0 - m) * torch.finfo(self.dtype).min

        def get_head_mask(self, head_mask, num_layers):
            assert head_mask is None
            return [None] * num_layers

        bert.invert_attention_mask, bert.get_head_mask, bert.all_tied_weights_keys = (
            invert_attention_mask, get_head_mask, {})
    return mods


def test_imagereward_oracle(tmp_path):
    ir, med, vit, bp = _import_imagereward()
    from transformers import BertTokenizer

    from ctrldiff.rewards.models.imagereward import load_imagereward

    torch.manual_seed(0)
    W, H, S, P = 64, 64, 32, 8  # widths multiple of 64: ctrldiff reads heads = width / 64, as BLIP's ViT-L / BERT-base
    words = sorted({w for p in PROMPTS for w in p.split()})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizer(str(tmp_path / "vocab.txt"))  # then as BLIP's init_tokenizer (bert-base-uncased offline)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    med_config = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.0, hidden_act="gelu",
                      hidden_dropout_prob=0.0, hidden_size=H, initializer_range=0.02, intermediate_size=4 * H,
                      layer_norm_eps=1e-12, max_position_embeddings=40, model_type="bert", num_attention_heads=H // 64,
                      num_hidden_layers=2, pad_token_id=0, type_vocab_size=2, vocab_size=len(tok), encoder_width=W,
                      add_cross_attention=True)
    (tmp_path / "med_config.json").write_text(json.dumps(med_config))
    # BLIP_Pretrain / ImageReward as their __init__ builds them, at tiny sizes (theirs fix ViT-L at 224 px)
    blip = bp.BLIP_Pretrain.__new__(bp.BLIP_Pretrain)
    torch.nn.Module.__init__(blip)
    blip.visual_encoder = vit.VisionTransformer(img_size=S, patch_size=P, embed_dim=W, depth=2, num_heads=W // 64)
    blip.tokenizer = tok
    cfg = med.BertConfig.from_json_file(str(tmp_path / "med_config.json"))
    cfg.encoder_width = W
    blip.text_encoder = med.BertModel(config=cfg, add_pooling_layer=False)
    blip.vision_proj, blip.text_proj = torch.nn.Linear(W, 16), torch.nn.Linear(H, 16)
    model = ir.ImageReward.__new__(ir.ImageReward)
    torch.nn.Module.__init__(model)
    model.device, model.blip, model.preprocess, model.mlp = "cpu", blip, ir._transform(S), ir.MLP(H)
    model.mean, model.std = 0.16717362830052426, 1.0333394966054072
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for lin in model.mlp.layers:  # larger than ImageReward's init, so that the scores differ between inputs
            if isinstance(lin, torch.nn.Linear):
                lin.weight.normal_(0, lin.in_features ** -0.5)
    model.eval()
    torch.save(model.state_dict(), tmp_path / "ImageReward.pt")  # ImageReward.pt's layout: blip.*, mlp.*
    pil, x = _images(len(PROMPTS), S, seed=4)
    with torch.no_grad():
        theirs = torch.tensor([model.score(p, im) for p, im in zip(PROMPTS, pil, strict=True)])
        ours = load_imagereward(str(tmp_path), tokenizer=str(tmp_path))(x, PROMPTS)
    _close(ours, theirs)
    assert float(theirs.std()) > 1e-3  # the inputs matter
