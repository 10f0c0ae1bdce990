"""benchmarks/gpu_check.py cannot rot: its CPU dry run (every part, tiny sizes) runs here, and its --help says
what it measures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "gpu_check.py")


def test_gpu_check_help_says_what_it_measures():
    r = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for what in ("pytest -m gpu", "fp32 / bf16 / fp16 autocast", "ctrldiff train --device cuda", "512 px, batch 4",
                 "50 DDIM steps", "peak CUDA", "SD 3.5, FLUX", "--cpu"):
        assert what in r.stdout, what


@pytest.mark.slow
def test_gpu_check_cpu_dry_run(tmp_path):
    out = tmp_path / "summary.json"
    r = subprocess.run([sys.executable, SCRIPT, "--cpu", "--json-out", str(out)], capture_output=True, text=True,
                       timeout=400, cwd=tmp_path)
    summary = json.loads(out.read_text())
    assert r.returncode == 0 and summary["ok"], r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads(r.stdout) == summary  # the JSON summary is what it prints
    tests = summary["checks"]["gpu_tests"]
    assert tests["passed"] >= 7 and not tests["failed"]
    assert set(tests["skipped"]) == {"test_precision::test_ratio_is_one_for_a_diffusers_unet_under_cuda_autocast[fp16]"}
    assert {"tests/test_precision.py", "tests/test_gpu_run.py"} <= set(tests["files"])
    sd = summary["checks"]["sd15_lora_ctrl"]["result"]
    assert sd["tiny"] and sd["updates"] >= 1 and sd["epoch_s"] > 0
    flow = summary["checks"]["flow"]["architectures"]["sd35_medium"]
    assert flow["ok"] and flow["result"]["updates"] >= 1 and flow["result"]["epoch_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_check_without_cuda_points_to_the_dry_run():
    r = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--cpu" in r.stderr
