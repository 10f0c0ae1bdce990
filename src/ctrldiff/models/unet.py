"""A small class-conditional UNet for 8x8 (or 16x16) images, attention-free and fast on CPU.

eps_theta(x, t, c) for x [B, C, R, R]. Levels run at R, R/2 (and R/4 with three levels); each level
has GroupNorm + SiLU residual blocks conditioned on emb = TimeEmbedding(t) + LabelEmbedding(c).
The label embedding has num_classes + 1 rows; the last is the null token for classifier-free
guidance (condition dropout is done by the trainer, not by the model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CtrlDiffError
from .base import ConditionalMixin, TimeEmbedding, register_model


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    g = groups
    while ch % g:
        g //= 2
    return nn.GroupNorm(max(g, 1), ch)


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))) + W emb;  out = skip(x) + conv(SiLU(GN(h)))  (second conv zero-initialised)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int = 8, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x [B, cin, H, W], emb [B, emb_dim] (already passed through SiLU) -> [B, cout, H, W]."""
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


@register_model("unet")
class UNet(ConditionalMixin, nn.Module):
    """Class-conditional eps-prediction UNet.

    channels: width per level (len 2: R -> R/2; len 3: R -> R/2 -> R/4). num_res_blocks blocks per
    level on the way down and up, two in the middle. ~0.5M parameters with the defaults (32, 64).
    """

    def __init__(self, in_channels: int = 1, resolution: int = 8, channels: tuple[int, ...] | list[int] = (32, 64),
                 num_res_blocks: int = 1, emb_dim: int = 128, num_classes: int = 10, groups: int = 8,
                 dropout: float = 0.0, prediction: str = "eps"):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) not in (2, 3) or resolution % (2 ** (len(channels) - 1)):
            raise CtrlDiffError(f"unet needs 2 or 3 levels dividing the resolution, got channels={channels}, "
                                f"resolution={resolution}")
        self.config = dict(in_channels=in_channels, resolution=resolution, channels=list(channels),
                           num_res_blocks=num_res_blocks, emb_dim=emb_dim, num_classes=num_classes, groups=groups,
                           dropout=dropout, prediction=prediction)
        self.in_channels, self.resolution = in_channels, resolution
        self.num_classes, self.prediction = num_classes, prediction
        self.temb = TimeEmbedding(emb_dim)
        self.cemb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.inp = nn.Conv2d(in_channels, channels[0], 3, padding=1)

        def blocks(cin: int, cout: int) -> nn.ModuleList:
            return nn.ModuleList(ResBlock(cin if i == 0 else cout, cout, emb_dim, groups, dropout)
                                 for i in range(num_res_blocks))

        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        prev = channels[0]
        for i, ch in enumerate(channels):
            self.down.append(blocks(prev, ch))
            prev = ch
            if i < len(channels) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid = nn.ModuleList(ResBlock(prev, prev, emb_dim, groups, dropout) for _ in range(2))
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(channels))):
            ch = channels[i]
            self.up.append(blocks(prev + ch, ch))
            prev = ch
            if i > 0:
                self.upsample.append(nn.Conv2d(ch, channels[i - 1], 3, padding=1))
                prev = channels[i - 1]
        self.out_norm = _norm(channels[0], groups)
        self.out = nn.Conv2d(channels[0], in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    # ---- forward ---------------------------------------------------------------------------
    def _check(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            raise CtrlDiffError(f"unet expects input of shape [batch, {self.in_channels}, {self.resolution}, "
                                f"{self.resolution}], got {tuple(x.shape)}")

    def embed(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """SiLU(TimeEmbedding(t) + LabelEmbedding(c)) -> [B, emb_dim]; cond None = the null token."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.temb(t)
        c = self._cond_or_null(cond, x.shape[0], x.device)
        if c is not None:
            emb = emb + self.cemb(c)
        return F.silu(emb)

    def _encode(self, x: Tensor, emb: Tensor) -> tuple[list[Tensor], Tensor]:
        h, skips = self.inp(x), []
        for i, level in enumerate(self.down):
            for blk in level:
                h = blk(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        for blk in self.mid:
            h = blk(h, emb)
        return skips, h

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """x [B, C, R, R], t [B] (or scalar), cond [B] long labels (num_classes = null) -> eps [B, C, R, R]."""
        self._check(x)
        emb = self.embed(x, t, cond)
        skips, h = self._encode(x, emb)
        for j, level in enumerate(self.up):
            h = torch.cat([h, skips[-1 - j]], 1)
            for blk in level:
                h = blk(h, emb)
            if j < len(self.upsample):
                h = self.upsample[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))

    def encoder_features(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> list[Tensor]:
        """The down path's feature maps, one per level, and the middle's output.

        Returns [h_0 [B, ch0, R, R], h_1 [B, ch1, R/2, R/2], ..., h_mid [B, ch_last, r, r]]; used as a
        backbone for surrogate rewards (METHODS section 4: the encoder features at a small t)."""
        self._check(x)
        skips, h = self._encode(x, self.embed(x, t, cond))
        return [*skips, h]

    def pooled_features(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """Spatially averaged encoder features concatenated -> [B, sum(channels) + channels[-1]]."""
        return torch.cat([f.mean((-2, -1)) for f in self.encoder_features(x, t, cond)], 1)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
