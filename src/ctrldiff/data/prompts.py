"""Prompt sets for text-to-image fine-tuning: built-in lists, or a text file with one prompt per line.

Built-ins follow DDPO's prompt functions (the prompt is the bare class name): ``simple-animals`` (45 common
animals) and ``imagenet-animals`` (a small subset of ImageNet's animal classes).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CtrlDiffError

SIMPLE_ANIMALS = [
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
    "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark", "whale",
    "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig",
    "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
]

IMAGENET_ANIMALS = [
    "goldfish", "great white shark", "tree frog", "loggerhead sea turtle", "green iguana", "bald eagle",
    "flamingo", "king penguin", "golden retriever", "siberian husky", "tabby cat", "red fox", "polar bear",
    "monarch butterfly", "ladybug", "sea urchin", "hippopotamus", "giant panda", "koala", "orangutan",
]

BUILTIN_PROMPTS: dict[str, list[str]] = {"simple-animals": SIMPLE_ANIMALS, "imagenet-animals": IMAGENET_ANIMALS}


def load_prompts(spec: str) -> list[str]:
    """A built-in prompt set's name, or a UTF-8 text file with one prompt per line (blank lines and lines
    starting with '#' are skipped) -> the list of prompts (at least one)."""
    if spec in BUILTIN_PROMPTS:
        return list(BUILTIN_PROMPTS[spec])
    p = Path(spec).expanduser()
    if not p.is_file():
        raise CtrlDiffError(f"prompt set {spec!r} is neither a built-in ({', '.join(BUILTIN_PROMPTS)}) nor a text file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CtrlDiffError(f"prompt file {p} is not a UTF-8 text file") from None
    except OSError as e:
        raise CtrlDiffError(f"cannot read prompt file {p}: {e.strerror or e}") from None
    prompts = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
    if not prompts:
        raise CtrlDiffError(f"prompt file {p} holds no prompts (write one prompt per line)")
    return prompts
