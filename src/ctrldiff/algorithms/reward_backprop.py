r"""Reward backpropagation through the sampler: DRaFT-K (Clark et al. 2023) / AlignProp (Prabhudesai et al.
2023), METHODS section 2, with the project's KL_path regulariser.

Every rollout step of an affine solver (em, ddim(eta), ode-euler) is reparameterised by its recorded noise,
    x_{k+1} = A_k x_k + B_k eps_theta(t_k, x_k, c) + std_k xi_k,
so the final sample x_K is a differentiable function of theta. The loss, per minibatch of samples b, is
    L(theta) = -mean_b r(x_K^b, c_b) + beta * mean_b KL_path^b,
    KL_path^b = sum_k w_k ||eps_theta(t_k, x_k^b) - eps_ref(t_k, x_k^b)||^2      (Girsanov, solvers.kl_weights)
i.e. L = -J with J = E r - beta KL_path (``reward_backprop.kl_penalty=false``: plain DRaFT, L = -E r).
DRaFT-K (``last_steps`` = n < K): the state x_{K-n} is taken from the rollout with a stop-gradient and only
the last n steps are re-run under grad (:func:`ctrldiff.solvers.replay_steps`), so dx/dtheta flows through
those n steps only. The KL terms of steps k < K - n enter with their explicit dependence on theta (states
fixed), those of the last n steps through both theta and the replayed states. n = K (``last_steps=0``, the
default) is the exact pathwise gradient of J for the discretised sampler.

What KL_path means here. On a stochastic sampler (em, ddim with eta > 0) the sum is the Girsanov path KL of
the policy's reverse SDE to the reference's, as for every other algorithm. On an ODE sampler (ddim eta=0,
ode-euler; e.g. few-step generators) the sampler's own path measures are deterministic and the path KL between
them is not defined: the penalty is then the same integral int (1/2) g^2 ||s_theta - s_ref||^2 dtau evaluated
along the ODE paths, i.e. the path KL between the reverse SDEs that the two score fields would drive
(an upper bound on KL(p_theta^SDE || p_ref^SDE) at the data end), which is also what the trainer logs as
KL_path, so J stays comparable across algorithms and samplers.

Reward queries: the trainer counts the rollout rewards; each reward call with gradient in the update is one
more true-reward query per sample (counted as ``value_reward_queries``), so an epoch costs batch_size
(rollout) + inner_epochs x batch_size (gradient calls; a remainder of batch_size / minibatch is skipped).
Several processes: ``minibatch`` is the global minibatch (each process differentiates ceil(minibatch / W) of its
own samples per step, the gradients are averaged before clipping); nothing else depends on the batch.
Needs a differentiable reward; memory grows with n x minibatch unless ``checkpoint`` is on.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from ..config import Strict
from ..rewards.base import call_reward
from ..solvers import kl_weights, model_eps, prediction_of, repeat_cond, replay_steps, select_cond
from .base import Algorithm, RolloutBatch, gradient_step, register_algorithm


class RewardBackpropConfig(Strict):
    last_steps: int = Field(0, ge=0, description="K of DRaFT-K: backpropagate through the last K sampler steps, "
                            "stop-gradient before them; 0: all steps (exact pathwise gradient)")
    kl_penalty: bool = Field(True, description="minimise -(E r - beta KL_path) with the run's beta; false: plain "
                             "DRaFT, -E r (KL_path is still logged)")
    checkpoint: bool = Field(False, description="gradient checkpointing per sampler step: memory of one step's "
                             "activations instead of K, at the cost of a second forward pass")
    minibatch: int = Field(64, ge=1, description="samples per gradient step (each sample's reward gradient is "
                           "evaluated once per inner epoch)")


def _eval_steps(model, process, xs: Tensor, times: Tensor, cond) -> Tensor:
    """eps of ``model`` at states xs [N, n, D] and times [n] (grad flows into xs and the model) -> [N, n, D]."""
    N, n = xs.shape[:2]
    flat = xs.reshape(N * n, *xs.shape[2:])
    eps = model_eps(model, process, flat, times.to(flat.dtype).repeat(N), repeat_cond(cond, n))
    return eps.reshape(xs.shape)


@register_algorithm("reward-backprop")
class RewardBackprop(Algorithm):
    needs_log_prob = False

    def __init__(self, cfg, trainer):
        super().__init__(cfg, trainer)
        self.acfg: RewardBackpropConfig = cfg.reward_backprop
        self.require_differentiable_reward()

    def grad_steps(self, K: int) -> int:
        """n: the number of final sampler steps the gradient flows through."""
        n = self.acfg.last_steps
        return K if n == 0 else min(n, K)

    def sample_loss(self, batch: RolloutBatch, idx: Tensor) -> tuple[Tensor, dict]:
        """-(mean r - beta mean KL_path) over samples ``idx`` [N], through the last n steps (module docstring)."""
        tr, traj = self.trainer, batch.traj
        K = traj.num_steps
        start = K - self.grad_steps(K)
        cond = select_cond(traj.cond, idx)
        states, eps = replay_steps(tr.policy, tr.process, traj, start, idx, checkpoint=self.acfg.checkpoint)
        task = tr.task  # latent models (once the trainer's decode / reward_cond hooks exist): r sees decoded x
        x_final = task.decode(states[:, -1], grad=True) if hasattr(task, "decode") else states[:, -1]
        r = call_reward(tr.reward, x_final, task.reward_cond(cond) if hasattr(task, "reward_cond") else cond, grad=True)
        tr.count_queries(len(idx), kind="value")
        loss = -r.mean()
        info = {"reward_grad_call": float(r.detach().mean())}
        if self.acfg.kl_penalty and self.cfg.beta > 0:
            w = kl_weights(tr.process, traj.times, prediction=prediction_of(tr.policy)).to(eps.dtype)
            eps_ref = _eval_steps(tr.ref, tr.process, states[:, :-1], traj.times[start:K], cond)
            kl = (w[start:] * (eps - eps_ref).flatten(2).pow(2).sum(-1)).sum(1)
            if start > 0:  # the prefix: states fixed (stop-gradient), explicit dependence on theta only
                eps_pre = _eval_steps(tr.policy, tr.process, traj.states[idx, :start], traj.times[:start], cond)
                kl = kl + (w[:start] * (eps_pre - batch.eps_ref[idx, :start]).flatten(2).pow(2).sum(-1)).sum(1)
            loss = loss + self.cfg.beta * kl.mean()
            info["kl_path_grad_call"] = float(kl.detach().mean())
        return loss, info

    def update(self, batch: RolloutBatch) -> dict:
        tr = self.trainer
        B = batch.traj.batch_size  # this process's samples (batch_size / W)
        sums: dict[str, float] = {}
        n_updates = 0
        for _ in range(self.inner_epochs()):
            # a global minibatch of reward_backprop.minibatch samples: ceil(minibatch / W) of this process's per
            # step, the same number of steps on every process; the gradient is averaged across processes
            for idx in tr.minibatches(B, self.acfg.minibatch, batch.traj.states.device):
                info = gradient_step(self, lambda sub: self.sample_loss(batch, sub), idx)
                for key, v in info.items():
                    sums[key] = sums.get(key, 0.0) + v
                n_updates += 1
        out = {f"train/{k}": v / max(n_updates, 1) for k, v in sums.items()}
        out["train/updates"] = n_updates
        out["train/grad_steps"] = self.grad_steps(batch.traj.num_steps)
        return out
