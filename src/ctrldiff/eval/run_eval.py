"""``ctrldiff eval``: evaluate an :class:`~ctrldiff.eval.target.EvalSetup` under several solvers / step counts.

Per solver: E r, std r, KL_path to the reference (Girsanov along the sampled paths) and J = E r - beta KL_path
(:func:`~ctrldiff.eval.evaluate.evaluate_policy`); for digits models also the classifier accuracy of the
conditional samples, the diversity in the classifier's feature space and the Frechet distance in that space
to the held-out real digits (next to a real-vs-real baseline); for '<gmm>-exact' tasks the optimality gap
against the exact tilted target p* and the MMD^2 to exact p* samples. Every number is JSON-ready.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import CtrlDiffError, check, choice
from ..solvers import SOLVERS
from .evaluate import evaluate_policy
from .metrics import classifier_accuracy, diversity, frechet_distance_from_features, optimality_gap
from .target import EvalSetup

DEFAULT_SOLVERS = "em:10,em:50,ddim:50,heun:25"


@dataclass(frozen=True)
class SolverSpec:
    name: str
    steps: int

    @property
    def label(self) -> str:
        return f"{self.name}:{self.steps}"


def parse_solvers(text: str, default_steps: int = 50) -> list[SolverSpec]:
    """'em:10,em:50,ddim:50,heun' -> solver specs ('NAME' alone uses ``default_steps``)."""
    specs = []
    for item in (s.strip() for s in text.split(",")):
        check(bool(item), f"empty entry in solver list {text!r}; write e.g. 'em:10,em:50,ddim:50'")
        name, _, steps = item.partition(":")
        choice("solver", name.strip(), SOLVERS)
        try:
            n = int(steps) if steps else default_steps
        except ValueError:
            raise CtrlDiffError(f"bad step count in {item!r}: write NAME:STEPS, e.g. em:50") from None
        check(n >= 1, f"steps must be >= 1 in {item!r}")
        specs.append(SolverSpec(name.strip(), n))
    return specs


def finite_or_none(obj):
    """Replace NaN / inf floats (recursively) by None so that the document is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    return obj


class DigitsYardstick:
    """Classifier-based metrics of digit samples and their real-vs-real baselines (computed once)."""

    def __init__(self, n: int, seed: int = 0):
        from ..assets import load_digit_classifier
        from ..data.digits import load_digits

        self.clf = load_digit_classifier()
        test, train = load_digits("test"), load_digits("train")
        self.test_features = self.features(test.images)
        g = torch.Generator().manual_seed(seed)
        k = min(max(n, 2), len(train))  # real-vs-real with as many real images as model samples: same FD bias
        idx = torch.randperm(len(train), generator=g)[:k]
        self.baseline = {
            "frechet_train_vs_heldout": frechet_distance_from_features(self.features(train.images[idx]),
                                                                       self.test_features),
            "n_train": k, "n_heldout": len(test),
            "diversity_heldout": _class_mean(diversity(self.test_features, test.labels)["per_cond"]),
            "accuracy_heldout": classifier_accuracy(self.logits(test.images), test.labels),
        }

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.clf.features(x[i:i + 512].clamp(-1, 1)) for i in range(0, len(x), 512)])

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.clf(x[i:i + 512].clamp(-1, 1)) for i in range(0, len(x), 512)])

    def metrics(self, samples: torch.Tensor, cond: torch.Tensor) -> dict:
        f = self.features(samples)
        div = diversity(f, cond)["per_cond"]
        return {"accuracy": classifier_accuracy(self.logits(samples), cond), "diversity": _class_mean(div),
                "diversity_per_class": div,
                "frechet": frechet_distance_from_features(f, self.test_features) if len(f) >= 2 else float("nan")}


def _class_mean(per_class: dict) -> float:
    vals = [v for v in per_class.values() if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def _exact_target(setup: EvalSetup):
    from ..data.toy2d import gmm_preset
    from .exact2d import TiltedTarget

    if setup.beta <= 0:
        return None
    return TiltedTarget(gmm_preset(setup.exact_preset), setup.reward, setup.beta)


def evaluate_setup(setup: EvalSetup, solvers: list[SolverSpec], n: int = 512, seed: int = 0,
                   eta: float = 0.0, device: str = "cpu") -> dict:
    """Evaluate ``setup`` with every solver (same seed: common random numbers) -> a JSON-ready document.
    ``device``: where ``setup``'s models live (``load_setup(..., device=)``); the metrics are computed on the CPU."""
    check(n >= 2, f"--n must be >= 2, got {n}")
    check(eta >= 0, f"--eta must be >= 0, got {eta}")
    check(len(solvers) > 0, "no solver to evaluate")
    with torch.device("cpu"):  # the yardsticks (classifier features, exact target) are CPU computations
        digits = DigitsYardstick(n, seed) if setup.is_digits else None
        target = _exact_target(setup) if setup.exact_preset else None
    cond = setup.conditions(n)
    rows = []
    for spec in solvers:
        task = setup.task
        res = evaluate_policy(setup.policy, setup.ref, setup.process, setup.reward, sample_shape=setup.sample_shape,
                              n=n, solver=spec.name, steps=spec.steps, eta=eta, cond=cond, seed=seed,
                              beta=setup.beta, return_samples=True, chunk=setup.chunk,
                              decode=None if task is None else task.decode,
                              reward_cond=None if task is None else task.reward_cond, device=device)
        x = res.pop("samples")
        res["label"] = spec.label + (f" (eta {eta:g})" if spec.name == "ddim" else "")
        with torch.device("cpu"):  # samples and conditions are on the CPU here
            if digits is not None:
                res.update(digits.metrics(x, cond))
            if target is not None:
                res["optimality_gap"] = _gap(target.J_star, res["objective"])
                dist = target.sample_distance(x, baseline=True, generator=torch.Generator().manual_seed(seed + 1))
                res.update({k: dist[k] for k in ("mmd", "mmd_baseline", "hist_kl", "hist_kl_baseline")})
        rows.append(res)
    doc = {"model": setup.name, "weights": setup.source, "reference": setup.ref_name, "run_dir": _str(setup.run_dir),
           "reward": getattr(setup.reward, "name", str(setup.reward)), "beta": setup.beta, "guidance": setup.guidance,
           "n": n, "seed": seed, "eta": eta, "kind": "digits" if digits else "exact-2d" if setup.exact_preset else
           "text-to-image" if setup.prompts else "other", "results": rows}
    if setup.prompts:
        doc["prompts"] = setup.prompts
    if digits is not None:
        doc["real_baseline"] = digits.baseline
    if setup.exact_preset:
        doc["exact"] = target.summary() if target is not None else None
    return finite_or_none(doc)


def _gap(j_star: float, j: float) -> float | None:
    try:
        return optimality_gap(j_star, j)
    except CtrlDiffError:
        return None


def _str(p) -> str | None:
    return None if p is None else str(p)
