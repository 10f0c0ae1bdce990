"""Experiment trackers of a run (``log.trackers``): TensorBoard and Weights & Biases.

Each epoch's metric record goes to every tracker as scalars (step = epoch), and every sample grid the trainer
writes (``samples/epoch_*.png``, ``samples/before_after.png``) as an image. A tracker whose package is missing is
switched off with one warning line naming the package, never silently. wandb honours its own environment
(``WANDB_MODE=offline`` writes the run under RUN_DIR/wandb for a later ``wandb sync``; ``WANDB_PROJECT``, ...).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("ctrldiff")

INSTALL_HINT = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


class Trackers:
    """The run's trackers, opened on first use (process 0 only). ``names``: a subset of ('tensorboard', 'wandb')."""

    def __init__(self, names: list[str], out: Path, config: dict | None = None, project: str = "ctrldiff"):
        self.out = Path(out)
        self.config = config or {}
        self.project = project
        self.names = list(dict.fromkeys(names))
        self._tb = None
        self._wandb = None
        self._opened = False

    def _open(self) -> None:
        if self._opened:
            return
        self._opened = True
        for name in list(self.names):
            try:
                (self._open_tensorboard if name == "tensorboard" else self._open_wandb)()
            except ImportError as e:
                self.names.remove(name)
                log.warning("%s logging is off: the %s package is not installed or not importable (%s; or leave it "
                            "out of log.trackers)", name, name, INSTALL_HINT[name])
                log.debug("importing %s failed: %s", name, e)

    def _open_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(self.out / "tensorboard"))

    def _open_wandb(self) -> None:
        import wandb

        id_file = self.out / "wandb_run_id"  # a resumed run continues the same wandb run
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        if run_id is None:
            import uuid

            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
        self._wandb = wandb.init(project=self.project, name=self.out.name, id=run_id, resume="allow",
                                 dir=str(self.out), config=self.config, reinit="create_new")

    @property
    def active(self) -> list[str]:
        self._open()
        return list(self.names)

    def log_scalars(self, record: dict, step: int) -> None:
        """Every int/float value of ``record`` (bools and the step key excluded)."""
        self._open()
        vals = {k: float(v) for k, v in record.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and k != "epoch"}
        if self._tb is not None:
            for k, v in vals.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(vals, step=step)

    def log_image(self, tag: str, path: str | Path, step: int) -> None:
        """A PNG the trainer wrote (a sample grid or the before/after figure)."""
        self._open()
        if self._tb is None and self._wandb is None:
            return
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        if self._tb is not None:
            self._tb.add_image(tag, arr, step, dataformats="HWC")
            self._tb.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(arr, caption=Path(path).name)}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        self._opened = False
