"""The benchmark suite (benchmarks/run.py): its page states the machine, seeds and time; a rerun reproduces every
non-timing number (the --check path); the comparison flags a changed number."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("bench_suite_run", ROOT / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_suite_run"] = mod
    spec.loader.exec_module(mod)
    return mod


def _run(suite, *args: str) -> dict:
    """``benchmarks/run.py --smoke ARGS`` in this process, restoring the thread count it sets."""
    threads = torch.get_num_threads()
    try:
        return suite.main(["--smoke", *args])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smoke(suite, tmp_path_factory):
    d = tmp_path_factory.mktemp("suite")
    res = _run(suite, "--sections", "finetune2d", "qlearning2d", "--json", str(d / "a.json"), "--doc", str(d / "BENCH.md"))
    return d, res


def test_page_states_machine_seeds_time_and_tables(smoke):
    d, res = smoke
    page = (d / "BENCH.md").read_text()
    assert "python benchmarks/run.py --smoke" in page
    assert "**Machine**" in page and f"{res['machine']['cores']} CPU cores" in page and "torch" in page
    assert "**Seeds**: 0, 1" in page and "**Time**" in page
    assert "| ctrl-a | 512 |" in page and "| ddpo | 256 |" in page  # every algo at every budget
    assert "q-learning (from data, no pretrained score)" in page and "DSM + dpok" in page
    assert "Not run: not part of the smoke mode" in page  # LaSRO is skipped with its reason
    assert (d / "benchmarks" / "finetune2d_mode_switch.png").stat().st_size > 1000
    saved = json.loads((d / "a.json").read_text())
    runs = saved["sections"]["finetune2d"]["runs"]
    assert {(r["algo"], r["seed"]) for r in runs} == {("ctrl-a", 0), ("ctrl-a", 1), ("ddpo", 0), ("ddpo", 1)}
    assert all(set(r["robust"]) == {"em:5", "em:20", "ddim:10"} for r in runs)
    # the continuous-time optimum under the same solvers, beside the reference
    optimal = saved["sections"]["finetune2d"]["optimal"]["mode_switch"]
    assert set(optimal) == {"em:5", "em:20", "ddim:10"} and "| exact optimal control |" in page
    assert optimal["em:20"] > saved["sections"]["finetune2d"]["reference"]["mode_switch"]["em:20"]


def test_rerun_reproduces_every_number(suite, smoke, tmp_path):
    d, _ = smoke
    res = _run(suite, "--sections", "finetune2d", "--json", str(tmp_path / "b.json"), "--check", str(d / "a.json"))
    c = res["check"]
    assert c["compared"] > 50 and c["equal"] == c["compared"], c["diffs"]


def test_check_flags_changed_numbers_and_ignores_timings(suite):
    old = {"sections": {"s": {"runs": [{"gap": 0.5, "wall_s": 3.0, "robust": {"em:5": 1.0}}]}}}
    new = {"sections": {"s": {"runs": [{"gap": 0.5, "wall_s": 9.0, "robust": {"em:5": 1.25}}]}}}
    n, eq, diffs = suite.check_against(old, new)
    assert (n, eq) == (2, 1) and diffs == ["/s/runs[0]/robust/em:5: 1 -> 1.25"]
    assert suite.cell([1.0, 3.0]) == "2.000 ± 1.414" and suite.cell([]) == "—"


def test_baselines_section_smoke(suite, tmp_path):
    """The section 9 baselines on the yardstick: the discretisation floor first, then each method's rows."""
    res = _run(suite, "--sections", "baselines", "--json", str(tmp_path / "b.json"), "--doc", str(tmp_path / "B.md"))
    data = res["sections"]["baselines"]
    assert [r["algo"] for r in data["runs"]] == ["adjoint-matching", "diffusion-nft"]
    fl = data["floors"][0]
    assert fl["reward"] == "mode_switch" and 0 < fl["gap"] < 0.3 and fl["kl_path"] > 0
    page = (tmp_path / "B.md").read_text()
    assert "Discretisation floor" in page and "| adjoint-matching | 512 |" in page
    assert (tmp_path / "benchmarks" / "baselines_mode_switch.png").exists()


def test_flow_yardstick_section_has_every_algo_and_the_floor(suite, tmp_path):
    res = _run(suite, "--sections", "flow2d", "--json", str(tmp_path / "f.json"), "--doc", str(tmp_path / "F.md"))
    page = (tmp_path / "F.md").read_text()
    assert "| exact optimal control (floor, ddim 20) |" in page
    assert "| ctrl-a | 512 |" in page and "| dpok | 256 |" in page
    fl = res["sections"]["flow2d"]["floors"][0]
    assert fl["solver"] == "ddim" and fl["kl_path"] > 0 and fl["gap"] < 0.2  # the optimal control is near J*
