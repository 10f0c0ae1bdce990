"""One process vs two: the same CTRL run (same global batch) launched as 1 and as 2 processes.

    python benchmarks/distributed_scaling.py [--seeds 0 1 2] [--epochs 12] [--batch-size 64] [--model gmm2-exact]

Each configuration runs through the real command line: ``python -m ctrldiff train ...`` (1 process) and
``accelerate launch --cpu --num_processes 2 -m ctrldiff train ...`` (2 processes, gloo). Reports per run the wall
time of the whole command and the training time (``wall_s`` of process 0 in metrics.jsonl), the reward curve and
the held-out final evaluation (fixed noise), and over the seeds the mean curve of each process count, so that the
2-process curve can be compared with the 1-process one (the same statistics, different rollout noise on
process 1). Writes benchmarks/results/distributed_scaling.json. Timings on a shared machine are noisy: the file
records the load average at the start of every run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_one(procs: int, seed: int, args, workdir: Path) -> dict:
    out = workdir / f"p{procs}_s{seed}"
    train = ["train", "--model", args.model, "--reward", args.reward, "--batch-size", str(args.batch_size),
             "--steps", str(args.steps), "--epochs", str(args.epochs), "--seed", str(seed), "--out", str(out),
             "--set", "log.tensorboard=false", "--set", f"log.num_final_eval={args.final_eval}",
             "--set", "log.num_eval_samples=64", "--set", f"log.checkpoint_every={args.epochs}",
             "--quiet", "--threads", "1"]
    if procs == 1:
        cmd = [sys.executable, "-m", "ctrldiff", *train]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", _port(), "-m", "ctrldiff", *train]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, timeout=1800)
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    fe = json.loads((out / "final_eval.json").read_text()) if args.final_eval else None
    return {"processes": procs, "seed": seed, "command_s": round(wall, 2), "train_s": recs[-1]["wall_s"],
            "load_avg_1min": round(load, 2), "reward_curve": [r["reward_mean"] for r in recs],
            "kl_curve": [r["kl_path"] for r in recs], "reward_queries": recs[-1]["reward_queries"],
            "final_eval_after": None if fe is None else fe["after"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default="gmm2-exact")
    ap.add_argument("--reward", default="toy2d-mode-switch")
    ap.add_argument("--final-eval", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed_scaling.json"))
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for procs in (1, 2):
                r = run_one(procs, seed, args, Path(tmp))
                print(f"{procs} process(es), seed {seed}: command {r['command_s']:.1f} s, training {r['train_s']:.1f} s"
                      f", load {r['load_avg_1min']}, reward {r['reward_curve'][0]:.3f} -> {r['reward_curve'][-1]:.3f}",
                      flush=True)
                runs.append(r)
    summary = {}
    for procs in (1, 2):
        rs = [r for r in runs if r["processes"] == procs]
        curves = list(zip(*[r["reward_curve"] for r in rs], strict=True))
        last3 = [statistics.mean(r["reward_curve"][-3:]) for r in rs]
        summary[str(procs)] = {
            "command_s_mean": round(statistics.mean(r["command_s"] for r in rs), 2),
            "train_s_mean": round(statistics.mean(r["train_s"] for r in rs), 2),
            "reward_curve_mean": [round(statistics.mean(c), 4) for c in curves],
            "last3_reward_mean": round(statistics.mean(last3), 4),
            "last3_reward_sd_over_seeds": round(statistics.stdev(last3), 4) if len(last3) > 1 else None,
            "final_eval_reward_after": [r["final_eval_after"]["reward_mean"] for r in rs if r["final_eval_after"]],
            "final_eval_kl_after": [r["final_eval_after"]["kl_path"] for r in rs if r["final_eval_after"]],
        }
    res = {"config": vars(args), "machine": f"{os.cpu_count()} CPU cores, shared with other jobs", "runs": runs,
           "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    for procs, s in summary.items():
        print(f"{procs} process(es): command {s['command_s_mean']} s, training {s['train_s_mean']} s, reward over the "
              f"last 3 epochs {s['last3_reward_mean']} (sd over seeds {s['last3_reward_sd_over_seeds']}), held-out "
              f"reward after {[round(v, 4) for v in s['final_eval_reward_after']]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
