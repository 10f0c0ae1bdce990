"""Measure the 2-step distilled digits generator and (with --write) add it to ``src/ctrldiff/assets/manifest.json``.

    python benchmarks/eval_digits_2step.py --run runs/distill-digits-2step [--n 1000] [--write]

Copies RUN/model.{safetensors,json} to src/ctrldiff/assets/digits_2step.* (with --write) and reports, at 1 and
2 deterministic DDIM steps: the shipped classifier's accuracy on the requested labels, the Frechet distance in
its feature space to the 300 held-out digits and the diversity; the same for the teacher (the shipped digits
UNet with CFG 2, the scale distilled into the student) at 1, 2 and 8 DDIM steps, and the real-vs-real baseline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ctrldiff import assets
from ctrldiff.models import load_model
from ctrldiff.train.distill import few_step_quality, real_frechet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/distill-digits-2step")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    student = load_model(Path(args.run) / "model")
    teacher = assets.load_digits_model()
    rnd = lambda q: {k: round(v, 4) if isinstance(v, float) else v for k, v in q.items()}  # noqa: E731
    quality = {f"{k}step": rnd(few_step_quality(student, k, n=args.n)) for k in (1, 2)}
    g = student.metadata.get("guidance_distilled")
    teacher_q = {f"{k}step": rnd(few_step_quality(teacher, k, n=args.n, guidance=g)) for k in (1, 2, 8)}
    real = {k: round(v, 4) for k, v in real_frechet().items()}
    print(json.dumps({"student": quality, "teacher_ddim": teacher_q, "real_vs_real": real}, indent=1))
    if not args.write:
        return
    meta = student.metadata
    stem = assets.ship_run(
        args.run, assets.DIGITS_2STEP, student, "python benchmarks/eval_digits_2step.py --run " + args.run + " --write",
        train_cpu_s=meta.get("train_cpu_s"), distilled_from=assets.DIGITS_MODEL,
        method="progressive distillation (ctrldiff.train.distill), "
        f"DDIM {meta['teacher_steps']} -> {meta['generator_steps']} steps, CFG {g} distilled in",
        quality={"sampler": "ddim eta=0, no guidance", "samples": args.n, "seed": 0, "judge": assets.DIGIT_CLASSIFIER,
                 "frechet": "squared Frechet distance in the judge's 128-d feature space to the 300 held-out digits",
                 **quality, "teacher_ddim_cfg": teacher_q, "real_vs_real": real})
    print(f"wrote {stem}.* and the manifest entry {assets.DIGITS_2STEP!r}")


if __name__ == "__main__":
    main()
