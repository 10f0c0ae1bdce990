"""``ctrldiff report``: a self-contained HTML page for two tiny runs, checked as HTML and in a headless browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from click.testing import CliRunner

from ctrldiff.cli import main
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.trainer import Trainer

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))


def _images(page: str) -> list[str]:
    p = _Images()
    p.feed(page)
    return p.srcs


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny gmm2-exact runs (CTRL and DDPO), 2 epochs x 32 trajectories x 8 steps each."""
    root = tmp_path_factory.mktemp("runs")
    out = []
    for algo in ("ctrl", "ddpo"):
        torch.manual_seed(0)
        cfg = TrainConfig(algo=algo, model="gmm2-exact", reward="toy2d-mode-switch", beta=0.5, epochs=2, batch_size=32,
                          sampler=dict(solver="em", steps=8), optim=dict(lr=1e-3, minibatch=64),
                          log=dict(progress=False, tensorboard=False, num_eval_samples=32))
        Trainer(cfg, root / f"{algo}-gmm2").train()
        out.append(root / f"{algo}-gmm2")
    return out


@pytest.fixture(scope="module")
def report(two_runs, tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    r = CliRunner().invoke(main, ["report", *map(str, two_runs), "--out", str(path), "--n", "32",
                                  "--solvers", "em:4,em:8,heun:4"])
    assert r.exit_code == 0, r.output
    return path


def test_report_is_self_contained(report):
    page = report.read_text()
    srcs = _images(page)
    assert len(srcs) == 3  # overlaid curves + one before/after per run
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in page and "https://" not in page
    for text in ("ctrl: ctrl-gmm2", "ddpo: ddpo-gmm2", "Solver / step robustness", "heun:4", "exact J*",
                 "reward queries", "final eval J", "toy2d-mode-switch"):
        assert text in page


def test_report_without_robustness(two_runs, tmp_path):
    out = tmp_path / "r.html"
    r = CliRunner().invoke(main, ["report", str(two_runs[0]), "--out", str(out), "--no-robustness"])
    assert r.exit_code == 0, r.output
    page = out.read_text()
    assert "robustness" not in page and len(_images(page)) == 2


def test_report_rejects_a_non_run(tmp_path):
    r = CliRunner().invoke(main, ["report", str(tmp_path), "--out", str(tmp_path / "r.html")])
    assert r.exit_code == 1 and "not a ctrldiff run directory" in r.output


def _browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


@pytest.mark.skipif(_browser() is None, reason="no headless browser: none of chromium, chromium-browser, "
                    "google-chrome is on PATH (apt-get install -y chromium)")
def test_report_renders_in_headless_browser(report, tmp_path):
    from PIL import Image

    flags = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000"]
    url = report.resolve().as_uri()
    # the page's inline script marks every <img> with data-loaded (naturalWidth > 0) on the load event
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    n = len(_images(report.read_text()))
    assert f'data-images="{n}/{n}"' in dom, dom[:500]
    assert dom.count('data-loaded="1"') == n and 'data-loaded="0"' not in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 2000)
    lo, hi = img.getextrema()
    colours = len(img.getcolors(maxcolors=1 << 16) or [])
    assert hi - lo > 100 and colours > 20, "the screenshot is blank"
    assert re.search(r"<h2>Training curves</h2>", dom)
