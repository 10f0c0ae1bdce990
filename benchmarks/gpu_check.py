"""The GPU check: one command, under 8 minutes on one H100 / H200, that ends with a JSON summary on stdout.

What it measures (each part in its own subprocess, with its own time limit, so a crash or an out-of-memory in
one part still leaves the others' results):

  gpu_tests       the tests marked ``gpu`` (pytest -m gpu; every tests/*.py that has the marker):
                  the likelihood ratio is 1 at theta_old under fp32 / bf16 / fp16 autocast (the built-in MLP and a
                  tiny SD 1.5-shaped UNet), and a whole ``ctrldiff train --device cuda`` + ``ctrldiff eval
                  --device cuda`` run on the shipped digits model (eval reproduces final_eval.json).
                  Reports passed / failed / skipped, the failures' first lines and each test's time.
  sd15_lora_ctrl  one LoRA CTRL epoch on an SD 1.5-architecture pipeline with random weights built offline
                  (benchmarks/gpu_sd15_lora_ctrl.py: 860M-parameter UNet, 512 px, batch 4, 50 DDIM steps,
                  CFG 7.5, bf16, gradient checkpointing): setup and epoch wall time, peak CUDA memory
                  (torch.cuda.max_memory_allocated; goal < 10 GB), then the run's final evaluation on the
                  device (4 samples before / after: what crashed a --device cuda run before).
  flow            the same epoch for the flow architectures (SD 3.5, FLUX; FLOW_CHECKS below: SD3.5-Medium through
                  benchmarks/gpu_flow_lora.py, 1024 px, bf16, LoRA): time and peak memory.

    python benchmarks/gpu_check.py                  # on a GPU machine (exit status 1 if any part failed)
    python benchmarks/gpu_check.py --cpu            # dry run of every part on the CPU at tiny sizes (~30 s)
    python benchmarks/gpu_check.py --only gpu_tests --json-out summary.json

``--cpu`` runs the same code paths: the ``gpu`` tests on the CPU (CTRLDIFF_GPU_TESTS_ON_CPU=1; fp16 diffusers is
skipped there, it needs CUDA) and the SD epoch with ``--tiny`` sizes. tests/test_gpu_check.py runs it in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ---- flow architectures (SD 3.5 / FLUX) ------------------------------------------------------------------------
# HOOK for the flow-models work: one entry per architecture, name -> (the command's arguments after the Python
# executable, its time limit in seconds on the GPU, the same for --cpu). The command writes one JSON object (like
# benchmarks/gpu_sd15_lora_ctrl.py: epoch_s, setup_s, max_memory_allocated_gb, ...) to the path given by --out, which
# gpu_check appends. Example, once benchmarks/gpu_flow_lora_ctrl.py exists:
#     "sd35": (["benchmarks/gpu_flow_lora_ctrl.py", "--arch", "sd35"], 240, ["--tiny"]),
FLOW_CHECKS: dict[str, tuple[list[str], int, list[str]]] = {
    # SD3.5-Medium architecture from its config (random weights), 1024 px, bf16, LoRA rank 16: one CTRL epoch
    "sd35_medium": (["benchmarks/gpu_flow_lora.py", "--dtype", "bf16"], 240,
                    ["--cpu", "--max-sequence-length", "16", "--batch", "2", "--steps", "2"]),
}


def _env(cpu: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    if cpu:
        env.update(CTRLDIFF_GPU_TESTS_ON_CPU="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _run(cmd: list[str], timeout: float, cpu: bool) -> tuple[int | None, str, float]:
    """(exit status or None on timeout, the output's last 4000 characters, wall seconds)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=_env(cpu), capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
    return rc, out[-4000:], round(time.perf_counter() - t0, 2)


def gpu_test_files() -> list[str]:
    """Every tests/*.py that marks a test ``gpu``."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if re.search(r"pytest\.mark\.gpu\b", p.read_text()))


def check_gpu_tests(cpu: bool, timeout: float) -> dict:
    files = gpu_test_files()
    if not files:
        return {"ok": False, "error": "no test is marked gpu"}
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={junit}",
               *files]
        rc, tail, wall = _run(cmd, timeout, cpu)
        res = {"files": files, "wall_s": wall, "exit_status": rc}
        if rc is None:
            return {**res, "ok": False, "error": f"timed out after {timeout:.0f} s", "output_tail": tail}
        if not junit.exists():
            return {**res, "ok": False, "error": "pytest wrote no report", "output_tail": tail}
        cases = ET.parse(junit).getroot().iter("testcase")
        tests, failed, skipped = {}, {}, {}
        for c in cases:
            name = f"{Path(c.get('file') or c.get('classname', '').replace('.', '/')).stem}::{c.get('name')}"
            tests[name] = round(float(c.get("time", 0)), 2)
            for tag in ("failure", "error"):
                el = c.find(tag)
                if el is not None:
                    failed[name] = (el.get("message") or el.text or tag).strip().splitlines()[0][:300]
            el = c.find("skipped")
            if el is not None:
                skipped[name] = (el.get("message") or "").strip()[:200]
    passed = len(tests) - len(failed) - len(skipped)
    out = {**res, "ok": rc == 0 and not failed and passed > 0, "passed": passed, "failed": failed,
           "skipped": skipped, "test_s": tests}
    if not out["ok"]:
        out["output_tail"] = tail
    return out


def _json_check(script: list[str], timeout: float, cpu: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "result.json"
        rc, tail, wall = _run([sys.executable, *script, "--out", str(dest)], timeout, cpu)
        res = {"command": " ".join(["python", *script]), "wall_s": wall, "exit_status": rc}
        if rc is None:
            return {**res, "ok": False, "error": f"timed out after {timeout:.0f} s", "output_tail": tail}
        if rc != 0 or not dest.exists():
            return {**res, "ok": False, "error": "failed", "output_tail": tail}
        return {**res, "ok": True, "result": json.loads(dest.read_text())}


def check_sd15(cpu: bool, timeout: float) -> dict:
    script = ["benchmarks/gpu_sd15_lora_ctrl.py"]
    script += ["--tiny", "--steps", "2", "--batch", "2", "--final-eval", "2"] if cpu else [
        "--resolution", "512", "--batch", "4", "--steps", "50", "--dtype", "bf16", "--final-eval", "4"]
    out = _json_check(script, timeout, cpu)
    r = out.get("result")
    if r is not None:
        bad = [k for k in ("setup_s", "epoch_s", "rollout_s") if not (isinstance(r.get(k), int | float) and r[k] >= 0)]
        fe = r.get("final_eval") or {}
        if bad or r.get("updates", 0) < 1 or not all(isinstance(fe.get(k), float) for k in ("reward_before",
                                                                                             "reward_after")):
            out.update(ok=False, error=f"implausible result: {bad or 'no policy update or no final evaluation'}")
        if not cpu:
            mem = r.get("max_memory_allocated_gb")
            out["under_10gb"] = mem is not None and mem < 10
    return out


def check_flow(cpu: bool, timeout: float) -> dict:
    if not FLOW_CHECKS:
        return {"ok": True, "status": "pending: no flow architecture registered in FLOW_CHECKS yet"}
    res = {}
    for name, (script, limit, cpu_args) in FLOW_CHECKS.items():
        res[name] = _json_check(script + (cpu_args if cpu else []), min(limit, timeout), cpu)
    return {"ok": all(r["ok"] for r in res.values()), "architectures": res}


# time limits (s) on the GPU (upper bounds; a part that hits its limit is reported as failed and the next one runs)
CHECKS = {"gpu_tests": (check_gpu_tests, 150), "sd15_lora_ctrl": (check_sd15, 300), "flow": (check_flow, 240)}


def machine(cpu: bool) -> dict:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda_available":
            torch.cuda.is_available(), "mode": "cpu dry run" if cpu else "gpu"}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, memory_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    device_count=torch.cuda.device_count())
    for mod in ("diffusers", "transformers", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU at tiny sizes (what CI runs)")
    ap.add_argument("--only", action="append", choices=list(CHECKS), help="run only this part (repeatable)")
    ap.add_argument("--json-out", default=None, help="also write the summary to this file")
    args = ap.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --cpu for the dry run", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    summary = {"machine": machine(args.cpu), "checks": {}}
    for name in args.only or list(CHECKS):
        fn, limit = CHECKS[name]
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        summary["checks"][name] = fn(args.cpu, limit * (3 if args.cpu else 1))  # a loaded CI machine: slower
        print(f"gpu_check: {name} {'ok' if summary['checks'][name]['ok'] else 'FAILED'}", file=sys.stderr, flush=True)
    summary["ok"] = all(c["ok"] for c in summary["checks"].values())
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(summary, indent=1)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
