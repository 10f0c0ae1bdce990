"""Measure the shipped digits assets and (re)write ``src/ctrldiff/assets/manifest.json``.

    python benchmarks/eval_assets.py [--guidance 2] [--solver em] [--steps 50] [--per-class 100] [--write]
    python benchmarks/eval_assets.py --sweep 1,2,3     # accuracy of conditional samples vs the CFG scale

Quality numbers: the classifier's accuracy on the 300 held-out digits; the fraction of class-
conditional samples (per_class per label) that the shipped classifier labels as the requested class.
The manifest records every file's sha256 and size; ``ctrldiff verify-assets`` checks them.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ctrldiff import assets
from ctrldiff.data.digits import load_digits
from ctrldiff.models.classifier import accuracy, conditional_sample_accuracy
from ctrldiff.models.unet import num_parameters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guidance", type=float, default=assets.DEFAULT_GUIDANCE)
    ap.add_argument("--solver", default="em")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", default=None, help="comma-separated guidance scales to compare (no manifest)")
    ap.add_argument("--write", action="store_true", help="write the manifest")
    ap.add_argument("--digits-out", default="runs/digits-unet", help="the --out of the pretrain command")
    ap.add_argument("--classifier-out", default="runs/classifier", help="the --out of the train-classifier command")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, clf = assets.load_digits_model(), assets.load_digit_classifier()
    if args.sweep:
        for g in (float(s) for s in args.sweep.split(",")):
            t0 = time.perf_counter()
            acc = conditional_sample_accuracy(model, clf, per_class=args.per_class, guidance=g, solver=args.solver,
                                              steps=args.steps, seed=args.seed)
            print(f"guidance {g:g}  {args.solver} {args.steps} steps  accuracy {acc:.4f}  ({time.perf_counter() - t0:.0f}s)")
        return
    test = load_digits("test")
    clf_acc = accuracy(clf, test.images, test.labels)
    t0 = time.perf_counter()
    cond_acc = conditional_sample_accuracy(model, clf, per_class=args.per_class, guidance=args.guidance,
                                           solver=args.solver, steps=args.steps, seed=args.seed)
    print(f"classifier held-out accuracy {clf_acc:.4f}")
    print(f"conditional samples classified correctly {cond_acc:.4f} (guidance {args.guidance:g}, {args.solver}, "
          f"{args.steps} steps, {args.per_class * model.num_classes} samples, {time.perf_counter() - t0:.0f}s)")
    if not args.write:
        return

    def entry(stem: str, model_obj, quality: dict, copy_note: str) -> dict:
        meta = model_obj.metadata
        files = [assets.file_record(assets.ASSETS_DIR / f"{stem}.{ext}") for ext in ("safetensors", "json")]
        return {"files": files, "type": model_obj.model_type, "parameters": num_parameters(model_obj),
                "command": meta["command"] + copy_note, "train_time_s": meta["train_time_s"],
                "torch": torch.__version__, "quality": quality}

    doc = {
        "description": "Pretrained assets shipped with ctrldiff; check with `ctrldiff verify-assets`. Quality "
                       "measured by benchmarks/eval_assets.py on the fixed held-out split (ctrldiff.data.digits).",
        "assets": {
            assets.DIGITS_MODEL: entry(
                assets.DIGITS_MODEL, model,
                {"conditional_sample_accuracy": round(cond_acc, 4), "samples": args.per_class * model.num_classes,
                 "guidance": args.guidance, "solver": args.solver, "steps": args.steps, "seed": args.seed,
                 "judge": assets.DIGIT_CLASSIFIER, "final_dsm_loss": model.metadata.get("final_loss")},
                f" && cp {args.digits_out}/model.safetensors src/ctrldiff/assets/{assets.DIGITS_MODEL}.safetensors"
                f" && cp {args.digits_out}/model.json src/ctrldiff/assets/{assets.DIGITS_MODEL}.json"),
            assets.DIGIT_CLASSIFIER: entry(
                assets.DIGIT_CLASSIFIER, clf,
                {"held_out_accuracy": round(clf_acc, 4), "held_out_images": len(test)},
                f" && cp {args.classifier_out}/{assets.DIGIT_CLASSIFIER}.* src/ctrldiff/assets/"),
        },
    }
    assets.MANIFEST.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {assets.MANIFEST}")


if __name__ == "__main__":
    main()
