"""Atomic file writes (write, fsync, rename) and checkpoint rotation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, I/O error) leaves neither a torn file nor litter
        raise
    _fsync_dir(path.parent)


def atomic_torch_save(obj, path: str | Path) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line and fsync it."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a kill: ignore it
    return out


def save_checkpoint(state: dict, ckpt_dir: Path, epoch: int, keep: int = 2) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"epoch_{epoch:05d}.pt"
    atomic_torch_save(state, path)
    atomic_write_bytes(ckpt_dir / "latest", path.name.encode())
    for old in sorted(ckpt_dir.glob("epoch_*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def checkpoint_candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoint files, best first: the one the ``latest`` pointer names, then the others newest first."""
    ckpt_dir = Path(ckpt_dir)
    files = sorted(ckpt_dir.glob("epoch_*.pt"), reverse=True)
    ptr = ckpt_dir / "latest"
    try:
        name = ptr.read_text().strip() if ptr.is_file() else ""
    except (OSError, UnicodeDecodeError):
        name = ""
    first = [p for p in files if p.name == name]  # only a file that exists in ckpt_dir, never a path elsewhere
    return first + [p for p in files if p.name != name]


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    cands = checkpoint_candidates(ckpt_dir)
    return cands[0] if cands else None


def load_latest_checkpoint(ckpt_dir: Path, map_location=None) -> tuple[Path | None, dict | None, list[str]]:
    """Load the best checkpoint that reads back as a complete trainer state.

    Returns ``(path, state, rejected)``; ``rejected`` describes unreadable (corrupt, truncated) checkpoint files
    that were passed over, so that nothing corrupt is ever taken as the latest checkpoint.
    """
    rejected = []
    for p in checkpoint_candidates(ckpt_dir):
        try:
            st = torch.load(p, map_location=map_location, weights_only=False)
        except Exception as e:  # noqa: BLE001 - truncated zip, unpickling error, ...: not usable
            rejected.append(f"{p.name} ({type(e).__name__})")
            continue
        if isinstance(st, dict) and isinstance(st.get("epoch"), int) and "model" in st:
            return p, st, rejected
        rejected.append(f"{p.name} (not a trainer checkpoint)")
    return None, None, rejected
