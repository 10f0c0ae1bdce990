"""Evaluate a (fine-tuned) model: reward, KL_path to a reference and J, under any solver and step count."""

from __future__ import annotations

import torch

from ..rewards.base import call_reward
from ..solvers import evaluate_along, get_solver, kl_path, prediction_of


@torch.no_grad()
def evaluate_policy(model, ref, process, reward, *, sample_shape, n: int = 1000, solver: str = "em",
                    steps: int = 50, eta: float = 0.0, cond=None, seed: int = 0, chunk: int = 1000,
                    beta: float | None = None, return_samples: bool = False, decode=None, reward_cond=None,
                    device: str | torch.device = "cpu", return_terms: bool = False) -> dict:
    """Sample ``n`` points with ``solver``/``steps`` and report E r, std r, KL_path(model || ref) by Girsanov
    along the sampled paths, and J = E r - beta KL_path (if beta is given). ``cond``: [n] or None.
    ``decode`` / ``reward_cond`` map the final state / the condition to what the reward takes (latent
    text-to-image models: VAE decoding and the prompt strings; default: identity). ``device``: where the models
    live; the noise (a generator on that device), the time grid and the conditions are made there, the returned
    samples are on the CPU. ``return_terms``: also each sample's reward and KL_path ("rewards", "kl_paths", CPU)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    fn = get_solver(solver, **({"eta": eta} if solver in ("ddim", "eta") else {}))
    times = process.time_grid(steps, device=device)
    chunk = max(int(chunk), 1)
    rs, kls, finals = [], [], []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        c = None if cond is None else cond[start:start + m].to(device)
        x = torch.randn((m, *sample_shape), generator=g, device=device) * process.prior_std()
        traj = fn(model, x, times, process, c, generator=g)
        eps_ref = evaluate_along(ref, process, traj)
        kls.append(kl_path(process, traj, traj.outputs, eps_ref, prediction_of(model)).cpu())
        xr = traj.final if decode is None else decode(traj.final)
        rs.append(call_reward(reward, xr, c if reward_cond is None else reward_cond(c)).cpu())
        finals.append(traj.final.cpu())
    r, kl = torch.cat(rs), torch.cat(kls)
    out = {"solver": solver, "steps": steps, "n": n, "reward_mean": float(r.mean()), "reward_std": float(r.std()),
           "kl_path": float(kl.mean())}
    if beta is not None:
        out["objective"] = out["reward_mean"] - beta * out["kl_path"]
    if return_samples:
        out["samples"] = torch.cat(finals)
    if return_terms:
        out["rewards"], out["kl_paths"] = r, kl
    return out
