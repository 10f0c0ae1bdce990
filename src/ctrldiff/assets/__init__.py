"""Shipped, pretrained assets: the class-conditional digits UNet, its 2-step distilled generator, the rectified-flow
digits UNet (velocity prediction) and the digits classifier.

``manifest.json`` records, per asset, its files (name, sha256, size), the exact command that made
it, its training time and its measured quality. :func:`verify_manifest` (CLI: ``ctrldiff
verify-assets``) checks the files against it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch import nn

from ..errors import CtrlDiffError

ASSETS_DIR = Path(__file__).resolve().parent
MANIFEST = ASSETS_DIR / "manifest.json"
DIGITS_MODEL = "digits_unet"
DIGIT_CLASSIFIER = "digit_classifier"
DIGITS_2STEP = "digits_2step"
DIGITS_RF = "digits_rf"
# CFG scale and sampler at which the shipped digits model was measured (see manifest.json)
DEFAULT_GUIDANCE = 2.0


def default_digits_model_path() -> Path:
    """Path of the shipped class-conditional digits model's weights (``.safetensors``)."""
    return ASSETS_DIR / f"{DIGITS_MODEL}.safetensors"


def default_classifier_path() -> Path:
    """Path of the shipped digits classifier's weights (``.safetensors``)."""
    return ASSETS_DIR / f"{DIGIT_CLASSIFIER}.safetensors"


def _load(path: Path, what: str) -> nn.Module:
    from ..models import classifier as _c  # noqa: F401  (registers the model types)
    from ..models import load_model
    from ..models import unet as _u  # noqa: F401

    if not path.exists():
        raise CtrlDiffError(f"shipped {what} not found at {path}; reinstall ctrldiff or train one "
                            "(see assets/manifest.json for the command)")
    return load_model(path)


def load_digits_model(device: str = "cpu") -> nn.Module:
    """The shipped class-conditional digits UNet (eps prediction, VP process; eval mode, frozen)."""
    return _load(default_digits_model_path(), "digits model").to(device).requires_grad_(False)


def default_digits_2step_path() -> Path:
    """Path of the shipped 2-step digits generator's weights (progressive distillation of the digits UNet)."""
    return ASSETS_DIR / f"{DIGITS_2STEP}.safetensors"


def load_digits_2step_model(device: str = "cpu") -> nn.Module:
    """The shipped 2-step class-conditional digits generator (eps prediction, VP; CFG scale 2 distilled in:
    sample it with deterministic DDIM at 2 (or 1) steps and no guidance; eval mode, frozen)."""
    return _load(default_digits_2step_path(), "2-step digits generator").to(device).requires_grad_(False)


def default_digits_rf_path() -> Path:
    """Path of the shipped rectified-flow digits model's weights (``.safetensors``)."""
    return ASSETS_DIR / f"{DIGITS_RF}.safetensors"


def load_digits_rf_model(device: str = "cpu") -> nn.Module:
    """The shipped class-conditional rectified-flow digits UNet: velocity prediction v = eps - x0 on the process 'rf'
    (x_t = (1 - t) x0 + t eps); eval mode, frozen. Measured quality: manifest.json."""
    return _load(default_digits_rf_path(), "rectified-flow digits model").to(device).requires_grad_(False)


# model spec (``--model``) -> loader of the shipped model
SHIPPED_MODELS = {"digits": load_digits_model, "digits-2step": load_digits_2step_model, "digits-rf": load_digits_rf_model}


def load_shipped_model(name: str, device: str = "cpu") -> nn.Module:
    """One of :data:`SHIPPED_MODELS` ('digits', 'digits-2step', 'digits-rf')."""
    if name not in SHIPPED_MODELS:
        raise CtrlDiffError(f"no shipped model {name!r}; shipped: {', '.join(SHIPPED_MODELS)}")
    return SHIPPED_MODELS[name](device=device)


def load_digit_classifier(device: str = "cpu") -> nn.Module:
    """The shipped 8x8 digits classifier (logits over 10 classes; ``features`` for metrics)."""
    return _load(default_classifier_path(), "digit classifier").to(device).requires_grad_(False)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    """{"name", "sha256", "size"} of one file."""
    return {"name": path.name, "sha256": sha256(path), "size": path.stat().st_size}


def read_manifest(path: Path = MANIFEST) -> dict:
    if not path.exists():
        raise CtrlDiffError(f"asset manifest not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CtrlDiffError(f"asset manifest {path} is not valid JSON: {e}") from None


def ship_run(run_dir: str | Path, name: str, model: nn.Module, measured_by: str, **entry) -> Path:
    """Ship a training run's model as the asset ``name``: copy ``run_dir/model.{safetensors,json}`` here and write its
    manifest entry (files, type, parameters, the command that made it and the copy, training time, torch version, and
    ``entry``: e.g. its measured quality; ``measured_by``: the command that measured it). Returns the asset's stem."""
    import shutil

    import torch

    run_dir, stem = Path(run_dir), ASSETS_DIR / name
    for ext in ("safetensors", "json"):
        shutil.copyfile(run_dir / f"model.{ext}", stem.with_suffix(f".{ext}"))
    meta = model.metadata
    doc = read_manifest(MANIFEST)
    doc["assets"][name] = {
        "files": [file_record(stem.with_suffix(f".{ext}")) for ext in ("safetensors", "json")],
        "type": model.model_type, "parameters": sum(p.numel() for p in model.parameters()),
        "command": meta["command"] + "".join(f" && cp {run_dir}/model.{ext} src/ctrldiff/assets/{name}.{ext}"
                                             for ext in ("safetensors", "json")),
        "train_time_s": meta["train_time_s"], "torch": torch.__version__, **entry, "measured_by": measured_by}
    MANIFEST.write_text(json.dumps(doc, indent=2) + "\n")
    return stem


def verify_manifest(path: Path = MANIFEST) -> dict[str, str]:
    """Check every file listed in the manifest exists with the recorded size and sha256.

    Returns {file name: sha256}; raises :class:`CtrlDiffError` naming the first mismatch."""
    doc = read_manifest(path)
    checked = {}
    for asset in doc.get("assets", {}).values():
        for rec in asset["files"]:
            f = path.parent / rec["name"]
            if not f.exists():
                raise CtrlDiffError(f"asset file missing: {f}")
            if f.stat().st_size != rec["size"]:
                raise CtrlDiffError(f"asset {rec['name']} has size {f.stat().st_size}, manifest says {rec['size']}")
            digest = sha256(f)
            if digest != rec["sha256"]:
                raise CtrlDiffError(f"asset {rec['name']} sha256 {digest} does not match the manifest {rec['sha256']}")
            checked[rec["name"]] = digest
    if not checked:
        raise CtrlDiffError(f"asset manifest {path} lists no files")
    return checked
