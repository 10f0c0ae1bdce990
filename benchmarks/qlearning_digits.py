"""Digits from scratch with q-learning (conditional; METHODS section 3): no pretrained model, no DSM loss.

Task 'scratch-digits': a fresh class-conditional UNet (v-prediction, zero output = the N(0, I) score) and the
1,497 training digits. The running reward's target is the conditional ratio estimator over all the training
digits of the label (m = 0: the exact score of the label's noised empirical distribution). beta_q = 0 is pure
conditional score matching; --beta-q > 0 adds the download-free digit-alignment reward h = log p(c | x) of the
shipped classifier. Every --eval-every epochs, 500 samples (50 per label; EM, the training steps) are scored by the
shipped classifier: accuracy (argmax = label), mean log p(c | x), and the path KL to the data's empirical score
along the sampled paths. The shipped DSM-pretrained digits model is scored the same way for reference.

The ratio estimator's floor is 0 here: in 64 dimensions every off-manifold state of an early policy is farther
than the floor's cut-off from all training digits, so a floor would replace the pull towards the nearest digits
by the N(0, sigma^2) score (towards the all-grey image) on most visited states (see docs/QLEARNING.md).

Reward-directed runs (--beta-q > 0): the training reward is --reward (default digit-alignment, h = log p(c | x) of
the shipped classifier); --warm-epochs N first runs N epochs of pure score matching (beta_q = 0), then switches the
terminal weight to --beta-q (the critic keeps its learned U; J = beta_q H + phi U from then on). Every evaluation
scores the raw weights and, with --ema > 0, an exponential moving average of them (per-epoch decay --ema; the
raw weights of a constant-lr run swing by about +-0.1 in accuracy between evaluations, the average does not).
--lr-final < --lr decays the learning rate on a cosine over --minutes.

    python benchmarks/qlearning_digits.py --minutes 20                       # beta_q = 0 (the original run)
    python benchmarks/qlearning_digits.py --minutes 22 --beta-q 2 --warm-epochs 300 --ema 0.98 \
        --out benchmarks/results/qlearning_digits_reward.json
Writes the --out json and sample PNGs under its stem's folder (not committed).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from ctrldiff.eval.evaluate import evaluate_policy
from ctrldiff.rewards.base import make_reward
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.trainer import Trainer


def score(model, tr: Trainer, reward, steps: int, n: int = 500, seed: int = 0, samples_to: Path | None = None,
          train_reward=None) -> dict:
    """Accuracy / mean log p(c | x) of the shipped classifier and KL_path to the data on n samples (EM, `steps`);
    plus the mean training reward when it is not the classifier's log p(c | x)."""
    cond = torch.arange(n) % 10
    ev = evaluate_policy(model, tr.ref, tr.process, reward, sample_shape=tr.task.sample_shape, n=n, solver="em",
                         steps=steps, cond=cond, seed=seed, chunk=250, return_samples=True)
    x = ev.pop("samples")
    with torch.no_grad():
        logits = reward.classifier(x.clamp(-1, 1))
    out = {"accuracy": float((logits.argmax(-1) == cond).float().mean()), "log_p_c": ev["reward_mean"],
           "kl_path_to_data": ev["kl_path"]}
    if train_reward is not None:
        out["train_reward"] = float(train_reward(x, cond).mean())
    if samples_to is not None:
        from ctrldiff.data.digits import save_grid

        save_grid(x[:100], samples_to, nrow=10)
    return out


class EMA:
    """Exponential moving average of a model's weights, updated once per epoch."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model, self.decay = copy.deepcopy(model).requires_grad_(False).eval(), decay
        self.n = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))  # short warm-up: early averages do not drag the init
        for pe, p in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if pe.dtype.is_floating_point:
                pe.lerp_(p, 1 - d)
            else:
                pe.copy_(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-clock training budget")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--beta-q", type=float, default=0.0)
    ap.add_argument("--reward", default="digit-alignment", help="training reward (beta_q > 0)")
    ap.add_argument("--warm-epochs", type=int, default=0, help="pure score-matching epochs before beta_q is on")
    ap.add_argument("--warm-minutes", type=float, default=0.0, help="... or minutes of wall clock (whichever first "
                    "when both are set; on a shared machine the epochs per minute vary)")
    ap.add_argument("--ema", type=float, default=0.0, help="per-epoch EMA decay of the evaluated weights (0: off)")
    ap.add_argument("--lr-final", type=float, default=None, help="cosine-decay the lr to this over --minutes")
    ap.add_argument("--eval-n", type=int, default=500)
    ap.add_argument("--save", default=None, help="write the final policy / critic state here (for probes)")
    ap.add_argument("--init", default=None, help="start from a --save file (probes of the reward phase)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/qlearning_digits.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warm = args.warm_epochs > 0 or args.warm_minutes > 0
    beta_q0 = 0.0 if warm else args.beta_q
    cfg = TrainConfig(algo="q-learning", model="scratch-digits", reward=args.reward, epochs=10**6,
                      batch_size=args.batch_size, seed=args.seed, sampler=dict(solver="em", steps=args.steps),
                      optim=dict(lr=args.lr, minibatch=256), log=dict(progress=False, tensorboard=False),
                      qlearning=dict(beta_q=beta_q0, m=0, ratio_floor=0.0))
    tr = Trainer(cfg)
    reward = make_reward("digit-alignment")
    train_reward = None if args.reward == "digit-alignment" else tr.reward
    if args.init:
        st = torch.load(args.init)
        tr.task.model.load_state_dict(st["model"])
        tr.algo.critic.load_state_dict(st["critic"])
    ema = EMA(tr.task.model, args.ema) if args.ema > 0 else None

    def evaluate(tag: str | None) -> dict:
        out = score(tr.policy, tr, reward, args.steps, args.eval_n, train_reward=train_reward,
                    samples_to=None if tag is None else pics / f"{tag}.png")
        if ema is not None:
            ev = score(ema.model, tr, reward, args.steps, args.eval_n, train_reward=train_reward,
                       samples_to=None if tag is None else pics / f"{tag}_ema.png")
            out.update({f"ema_{k}": v for k, v in ev.items()})
        return out

    pics = Path(args.out).with_suffix("")
    pics.mkdir(parents=True, exist_ok=True)
    from ctrldiff.assets import load_digits_model

    shipped = score(load_digits_model(), tr, reward, args.steps, args.eval_n, samples_to=pics / "shipped.png")
    print(f"shipped DSM-pretrained model, EM {args.steps} steps: {shipped}", flush=True)
    curve = [{"epoch": 0, "train_s": 0.0, "beta_q": beta_q0, **evaluate(None)}]
    print(curve[-1], flush=True)
    train_s, t_start = 0.0, time.perf_counter()
    t_end = t_start + 60 * args.minutes
    rewards: list[float] = []
    while time.perf_counter() < t_end:
        elapsed = time.perf_counter() - t_start
        if warm and tr.algo.beta_q != args.beta_q and (
                (args.warm_epochs > 0 and tr.epoch >= args.warm_epochs)
                or (args.warm_minutes > 0 and elapsed >= 60 * args.warm_minutes)):  # the reward phase starts
            tr.algo.beta_q = tr.algo.critic.beta_q = args.beta_q
            print(f"epoch {tr.epoch} ({elapsed:.0f} s): beta_q -> {args.beta_q}", flush=True)
            curve.append({"epoch": tr.epoch, "train_s": round(train_s, 1), "beta_q": 0.0, "switch": True,
                          **evaluate(None)})
            print(curve[-1], flush=True)
        if args.lr_final is not None:
            frac = min(1.0, (time.perf_counter() - t_start) / (60 * args.minutes))
            lr = args.lr_final + 0.5 * (args.lr - args.lr_final) * (1 + math.cos(math.pi * frac))
            for g in tr.optimizer.param_groups:
                g["lr"] = lr
        t0 = time.perf_counter()
        rec = tr.step()
        train_s += time.perf_counter() - t0
        rewards.append(rec["reward_mean"])
        if ema is not None:
            ema.update(tr.task.model)
        if tr.epoch % args.eval_every == 0:
            curve.append({"epoch": tr.epoch, "train_s": round(train_s, 1), "beta_q": tr.algo.beta_q,
                          "lr": tr.optimizer.param_groups[0]["lr"], "kl_path_train": rec["kl_path"],
                          "rollout_reward": sum(rewards[-args.eval_every:]) / len(rewards[-args.eval_every:]),
                          **evaluate(f"epoch_{tr.epoch:05d}")})
            print(curve[-1], flush=True)
    if curve[-1]["epoch"] != tr.epoch:
        curve.append({"epoch": tr.epoch, "train_s": round(train_s, 1), "beta_q": tr.algo.beta_q,
                      **evaluate(f"epoch_{tr.epoch:05d}")})
    if args.save:
        torch.save({"model": tr.task.model.state_dict(), "critic": tr.algo.critic.state_dict()}, args.save)
    res = {"config": vars(args), "shipped": shipped, "curve": curve,
           "reward_queries": tr.reward_queries, "value_reward_queries": tr.value_reward_queries}
    Path(args.out).write_text(json.dumps(res, indent=1))
    e = ema is not None
    print("\n| epoch | train s | beta_q | accuracy | log p(c|x) | KL_path to data |"
          + (" EMA accuracy | EMA log p(c|x) | EMA KL_path |" if e else "")
          + "\n|---|---|---|---|---|---|" + ("---|---|---|" if e else ""))
    for c in curve:
        row = (f"| {c['epoch']} | {c['train_s']:.0f} | {c['beta_q']:g} | {c['accuracy']:.3f} | {c['log_p_c']:.2f} | "
               f"{c['kl_path_to_data']:.1f} |")
        if e:
            row += f" {c['ema_accuracy']:.3f} | {c['ema_log_p_c']:.2f} | {c['ema_kl_path_to_data']:.1f} |"
        print(row)
    print(f"| shipped DSM model | - | - | {shipped['accuracy']:.3f} | {shipped['log_p_c']:.2f} | "
          f"{shipped['kl_path_to_data']:.1f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
