"""benchmarks/ctrl_promises.py seeds: robustness files of several seeds per variant, side by side. The differences
are paired by the seed in each file's name, heun:25 is compared with the training solver per seed, and a bad
--variants argument is a one-line error."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def promises():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("ctrl_promises", ROOT / "benchmarks" / "ctrl_promises.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ctrl_promises"] = mod
    spec.loader.exec_module(mod)
    return mod


def _write(path: Path, j: dict[str, float], kl: float) -> None:
    rows = [{"solver": s, "ref": {"objective": 0.0, "reward_mean": 0.0, "kl_path": 0.0},
             "ft": {"objective": v, "reward_mean": v + 0.05 * kl, "kl_path": kl}} for s, v in j.items()]
    path.write_text(json.dumps({"rows": rows}))


def test_seeds_pairs_variants_by_seed_and_counts_heun_below_the_training_solver(promises, tmp_path):
    sol = promises.ROBUST_SOLVERS
    for seed, (a, b) in enumerate([(10.0, 11.0), (12.0, 12.5), (11.0, 12.5)]):
        _write(tmp_path / f"base_seed{seed}.json", dict.fromkeys(sol, a), kl=30.0)
        jb = dict.fromkeys(sol, b) | {"heun:25": b * (0.9 if seed == 1 else 0.99)}
        _write(tmp_path / f"var_seed{seed}.json", jb, kl=40.0 + seed)
    _write(tmp_path / "var_seed7.json", dict.fromkeys(sol, 99.0), kl=50.0)  # no baseline seed 7: not paired
    text = promises.seeds([f"base={tmp_path}/base_seed*.json", f"var={tmp_path}/var_seed*.json"])
    paired = next(line for line in text.splitlines() if line.startswith("| var | 3 |"))
    assert paired.split(" | ")[2] == "+1.000 ± 0.289"  # em:20: differences 1, 0.5, 1.5
    var = next(line for line in text.splitlines() if line.startswith("| var | 4 |"))
    assert var.endswith("| -1.0% -10.0% -1.0% +0.0% | 1 |")  # seeds 0, 1, 2, 7; only seed 1 more than 5% below
    assert "Over all 7 runs" in text
    for seed in (0, 1):  # files without heun:25: the other solvers, no heun column or correlation
        _write(tmp_path / f"noheun_seed{seed}.json", dict.fromkeys(sol[:2], 1.0 + seed), kl=10.0)
    text = promises.seeds([f"base={tmp_path}/base_seed*.json", f"noheun={tmp_path}/noheun_seed*.json"])
    assert "heun:25 |" not in text.splitlines()[2] and "Over all" not in text
    with pytest.raises(SystemExit, match="NAME=GLOB"):
        promises.seeds([str(tmp_path / "base_seed*.json")])
    with pytest.raises(SystemExit, match="no file matches"):
        promises.seeds([f"x={tmp_path}/nothing*.json"])
