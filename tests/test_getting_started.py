"""docs/GETTING_STARTED.md cannot rot: its CPU commands (steps 2 and 3) run as written, in order, in a fresh
directory, with tiny budgets appended (later options win)."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "GETTING_STARTED.md"
THREADS = ["--threads", "1"]
BUDGET = {  # appended to each command: tiny runs, one thread
    "train": ["--epochs", "1", "--batch-size", "10", "--steps", "4", "--quiet", *THREADS, "--set", "log.num_final_eval=10",
              "--set", "log.num_eval_samples=20", "--set", "ctrl.value.epochs=1", "--set", "log.trackers=[]"],
    "eval": ["--n", "4", *THREADS], "sample": ["--n", "4", "--steps", "2", *THREADS],
    "report": ["--n", "4", "--solvers", "em:2", *THREADS], "config": [], "export": [],
}


def cpu_part() -> tuple[list[str], dict[str, str]]:
    """The ``ctrldiff`` command lines and the Python files of the guide before its GPU section."""
    text = GUIDE.read_text().split("\n## 4.")[0]
    commands, files = [], {}
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S):
        if lang == "python":
            name = body.splitlines()[0].removeprefix("# ").strip()
            files[name] = body
        elif lang == "bash":
            commands += [line.strip() for line in body.replace("\\\n", " ").splitlines()
                         if line.strip().startswith("ctrldiff ")]
    return commands, files


def test_getting_started_cpu_commands_run(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ctrldiff.cli import main

    commands, files = cpu_part()
    assert len(commands) >= 8 and "brightness.py" in files
    work = tmp_path / "work"
    work.mkdir()
    for name, body in files.items():
        (work / name).write_text(body)
    monkeypatch.chdir(work)  # in-process (the console-script import path is tested in test_newcomer.py)
    monkeypatch.setattr(sys, "path", list(sys.path))
    outputs = {}
    for line in commands:
        line, _, redirect = line.partition(" > ")
        args = shlex.split(line.split("  #")[0])[1:]
        args += BUDGET[args[0]]
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, f"{line}\n{r.output}"
        if redirect:
            (work / redirect.strip()).write_text(r.stdout)
        outputs[line] = r.output
    first = outputs["ctrldiff train --algo ctrl --out runs/first"]
    assert first.strip().splitlines()[-1].startswith("result (held-out:")
    for path in ("runs/first/samples/before_after.png", "runs/first/reward_curve.png", "report.html",
                 "samples-first/samples.png", "my.yaml", "runs/beta01/final_eval.json", "runs/bright/final_eval.json",
                 "bright-digits/README.md", "bright-digits/model.safetensors"):
        assert (work / path).exists(), path
    assert "reward: brightness:brightness" in (work / "runs/bright/config.yaml").read_text()
    assert "beta: 0.1" in (work / "runs/beta01/config.yaml").read_text()


def test_guide_mentions_what_the_gpu_part_needs():
    text = GUIDE.read_text()
    gpu = text.split("\n## 4.")[1]
    for needle in ("examples/sd15-lora.yaml", "pipe.load_lora_weights", "ctrldiff export",
                   "pip install -e \".[diffusers]\""):
        assert needle in gpu
    assert (ROOT / "examples" / "sd15-lora.yaml").exists()
