"""Model rewards with user-supplied weights: LAION aesthetic, ImageReward, PickScore, HPSv2, CLIPScore.

Registering them imports nothing heavy: each factory imports transformers (the ``rewards`` extra) when called.
Spec strings: ``aesthetic:path=DIR``, ``imagereward:path=DIR``, ``pickscore:model=DIR_OR_HUB_ID``,
``hpsv2:path=FILE``, ``clipscore:model=DIR_OR_HUB_ID;w=2.5`` (see docs/REWARDS.md).
"""

from __future__ import annotations

from ..base import register_reward


def _need_transformers(name: str) -> None:
    import importlib.util

    from ...errors import CtrlDiffError

    if importlib.util.find_spec("transformers") is None:
        raise CtrlDiffError(f"reward {name!r} needs the transformers package: pip install 'ctrldiff[rewards]'")


@register_reward("aesthetic")
def aesthetic(path: str | None = None, head: str | None = None, clip: str | None = None):
    _need_transformers("aesthetic")
    from .aesthetic import load_aesthetic

    return load_aesthetic(path=path, head=head, clip=clip)


@register_reward("imagereward")
def imagereward(path: str | None = None, tokenizer: str | None = None):
    _need_transformers("imagereward")
    from .imagereward import load_imagereward

    return load_imagereward(path=path, tokenizer=tokenizer)


@register_reward("pickscore")
def pickscore(model: str = "yuvalkirstain/PickScore_v1", tokenizer: str | None = None):
    _need_transformers("pickscore")
    from .clip import load_pickscore

    return load_pickscore(model=model, tokenizer=tokenizer)


@register_reward("hpsv2")
def hpsv2(path: str | None = None, base: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", tokenizer: str | None = None):
    _need_transformers("hpsv2")
    from .clip import load_hpsv2

    return load_hpsv2(path=path, base=base, tokenizer=tokenizer)


@register_reward("clipscore")
def clipscore(model: str = "openai/clip-vit-base-patch32", tokenizer: str | None = None, w: float = 2.5):
    _need_transformers("clipscore")
    from .clip import load_clipscore

    return load_clipscore(model=model, tokenizer=tokenizer, w=w)
