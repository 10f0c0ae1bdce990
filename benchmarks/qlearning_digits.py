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

    python benchmarks/qlearning_digits.py --minutes 20
Writes benchmarks/results/qlearning_digits.json and samples PNGs under benchmarks/results/qlearning_digits/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ctrldiff.eval.evaluate import evaluate_policy
from ctrldiff.rewards.base import make_reward
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.trainer import Trainer


def score(model, tr: Trainer, reward, steps: int, n: int = 500, seed: int = 0, samples_to: Path | None = None) -> dict:
    cond = torch.arange(n) % 10
    ev = evaluate_policy(model, tr.ref, tr.process, reward, sample_shape=tr.task.sample_shape, n=n, solver="em",
                         steps=steps, cond=cond, seed=seed, chunk=250, return_samples=True)
    x = ev.pop("samples")
    with torch.no_grad():
        logits = reward.classifier(x.clamp(-1, 1))
    ev["accuracy"] = float((logits.argmax(-1) == cond).float().mean())
    if samples_to is not None:
        from ctrldiff.data.digits import save_grid

        save_grid(x[:100], samples_to, nrow=10)
    return {"accuracy": ev["accuracy"], "log_p_c": ev["reward_mean"], "kl_path_to_data": ev["kl_path"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-clock training budget")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--beta-q", type=float, default=0.0)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/qlearning_digits.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = TrainConfig(algo="q-learning", model="scratch-digits", reward="digit-alignment", epochs=10**6,
                      batch_size=args.batch_size, seed=args.seed, sampler=dict(solver="em", steps=args.steps),
                      optim=dict(lr=args.lr, minibatch=256), log=dict(progress=False, tensorboard=False),
                      qlearning=dict(beta_q=args.beta_q, m=0, ratio_floor=0.0))
    tr = Trainer(cfg)
    reward = make_reward("digit-alignment")
    pics = Path(args.out).with_suffix("")
    pics.mkdir(parents=True, exist_ok=True)
    from ctrldiff.assets import load_digits_model

    shipped = score(load_digits_model(), tr, reward, args.steps, samples_to=pics / "shipped.png")
    print(f"shipped DSM-pretrained model, EM {args.steps} steps: {shipped}", flush=True)
    curve = [{"epoch": 0, "train_s": 0.0, **score(tr.policy, tr, reward, args.steps)}]
    print(curve[-1], flush=True)
    train_s, t_end = 0.0, time.perf_counter() + 60 * args.minutes
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        rec = tr.step()
        train_s += time.perf_counter() - t0
        if tr.epoch % args.eval_every == 0:
            curve.append({"epoch": tr.epoch, "train_s": round(train_s, 1), "kl_path_train": rec["kl_path"],
                          **score(tr.policy, tr, reward, args.steps, samples_to=pics / f"epoch_{tr.epoch:05d}.png")})
            print(curve[-1], flush=True)
    if curve[-1]["epoch"] != tr.epoch:
        curve.append({"epoch": tr.epoch, "train_s": round(train_s, 1),
                      **score(tr.policy, tr, reward, args.steps, samples_to=pics / f"epoch_{tr.epoch:05d}.png")})
    res = {"config": vars(args), "shipped": shipped, "curve": curve,
           "reward_queries": tr.reward_queries, "value_reward_queries": tr.value_reward_queries}
    Path(args.out).write_text(json.dumps(res, indent=1))
    print("\n| epoch | train s | accuracy | log p(c|x) | KL_path to data |\n|---|---|---|---|---|")
    for c in curve:
        print(f"| {c['epoch']} | {c['train_s']:.0f} | {c['accuracy']:.3f} | {c['log_p_c']:.2f} | "
              f"{c['kl_path_to_data']:.1f} |")
    print(f"| shipped DSM model | - | {shipped['accuracy']:.3f} | {shipped['log_p_c']:.2f} | "
          f"{shipped['kl_path_to_data']:.1f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
