"""Fuzzing the config loader: whatever a config file, the command-line flags and ``--set key=value`` hold,
``build_train_config`` returns a valid TrainConfig (one that round-trips through the run's config.yaml) or
raises a one-line CtrlDiffError -- never another exception, never a hang."""

from __future__ import annotations

import itertools
import signal
import tempfile
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from ctrldiff.cli_train import build_train_config
from ctrldiff.config import apply_overrides, build_config, dump_yaml, load_yaml
from ctrldiff.errors import CtrlDiffError
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.trainer import check_runtime_config, load_run_config

FUZZ = settings(max_examples=150, deadline=timedelta(seconds=5), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HARD_LIMIT_S = 20  # a single example taking this long is a hang


@contextmanager
def _time_limit(seconds: float):
    def timeout(*_):
        raise TimeoutError(f"config loading did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _paths(cls: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, f in cls.model_fields.items():
        out.append(prefix + name)
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            out += _paths(f.annotation, f"{prefix}{name}.")
    return out


PATHS = _paths(TrainConfig)
NAMES = sorted({part for p in PATHS for part in p.split(".")})
VOCAB = ["ctrl", "ddpo", "ddpo-sf", "dpok", "q-learning", "em", "ddim", "ode-euler", "a", "b", "vp", "rf", "skip",
         "raise", "gmm2-exact", "toy2d-mode-switch", "cpu", "cuda", "gpu", "true", "null", "1e-3", "-1", "0", "auto"]
YAML_BITS = ["[1, 2]", "{a: 1}", ".inf", "-.inf", ".nan", "~", "!!binary aGk=", "2001-01-01", "&a [*a]", "'", '"',
             "[", "{", ": :", "- a", "!!python/name:os.system", "1_000", "0x1f", "0o17", "+12", "1e999", "'3'",
             "[" * 400 + "]" * 400, "[" * 600 + "]" * 600, "? a", "a: b: c", "\t", "%YAML 1.1", "*nope", "!!set {a}",
             "!!float 1",
             # PyYAML constructors raise ValueError / KeyError / AttributeError (not YAMLError) on these
             "!!float abc", "!!int x", "!!bool x", "!!timestamp 1", "2001-13-45", "2001-02-30"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12),
                    st.sampled_from(VOCAB))
keys = st.one_of(st.sampled_from(NAMES), st.text(max_size=8))
values = st.recursive(scalars, lambda ch: st.lists(ch, max_size=3) | st.dictionaries(keys, ch, max_size=3),
                      max_leaves=8)


@st.composite
def config_dicts(draw) -> dict:
    """Mostly-plausible nested configs: known paths with random values, plus a few random keys."""
    d: dict = {}
    for path in draw(st.lists(st.sampled_from(PATHS), max_size=6)):
        node, parts = d, path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = draw(st.one_of(values, st.sampled_from(VOCAB)))
    d.update(draw(st.dictionaries(keys, values, max_size=2)))
    return d


yaml_values = st.one_of(st.text(max_size=20), st.sampled_from(VOCAB + YAML_BITS), st.integers().map(str),
                        st.floats().map(repr))
overrides = st.lists(st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"{k}={v}", st.one_of(st.sampled_from(PATHS), st.text(max_size=12)), yaml_values),
), max_size=4)
flags = st.fixed_dictionaries({}, optional={  # what click hands build_train_config (types as the options declare)
    "model": st.one_of(st.text(max_size=10), st.sampled_from(["gmm2-exact", "digits"])),
    "reward": st.text(max_size=10), "beta": st.floats(), "epochs": st.integers(-5, 10**6),
    "batch_size": st.integers(), "solver": st.one_of(st.text(max_size=8), st.sampled_from(["em", "ddim", "ode-euler"])),
    "steps": st.integers(), "guidance": st.floats(), "seed": st.integers(-(2**70), 2**70), "lr": st.floats(),
    "device": st.one_of(st.text(max_size=8), st.sampled_from(VOCAB)), "estimator": st.sampled_from(["a", "b"]),
})
algos = st.one_of(st.none(), st.sampled_from(["ctrl", "ddpo", "ddpo-sf", "dpok"]))
config_files = st.one_of(
    st.none(),
    config_dicts().map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.text(max_size=60),
    st.lists(st.sampled_from(YAML_BITS + ["algo: ctrl", "sampler:", "  steps: 4", "beta: -1", "- x"]), max_size=5)
    .map("\n".join),
    st.binary(max_size=40),
)

_DIR = Path(tempfile.mkdtemp(prefix="ctrldiff-fuzz-"))
_COUNTER = itertools.count()


def _file(content: str | bytes) -> str:
    p = _DIR / f"cfg{next(_COUNTER)}.yaml"
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    return str(p)


def _valid_or_clear_error(fn) -> TrainConfig | None:
    """``fn()`` must return a TrainConfig that survives config.yaml (what --resume reads) and the runtime checks,
    or raise a non-empty one-line CtrlDiffError; within HARD_LIMIT_S."""
    t0 = time.perf_counter()
    with _time_limit(HARD_LIMIT_S):
        try:
            cfg = fn()
        except CtrlDiffError as e:
            msg = str(e)
            assert msg and "\n" not in msg and "\r" not in msg, msg
            return None
        assert isinstance(cfg, TrainConfig)
        run = _DIR / f"run{next(_COUNTER)}"
        run.mkdir()
        dump_yaml(cfg, run / "config.yaml")
        assert load_run_config(run) == cfg
        try:
            check_runtime_config(cfg)
        except CtrlDiffError as e:
            assert "\n" not in str(e) and ("device" in str(e) or "seed" in str(e))
    assert time.perf_counter() - t0 < HARD_LIMIT_S
    return cfg


@FUZZ
@given(algo=algos, content=config_files, flags=flags, sets=overrides)
def test_build_train_config_never_crashes(algo, content, flags, sets):
    config_file = None if content is None else _file(content)
    _valid_or_clear_error(lambda: build_train_config(algo, config_file, dict(flags), list(sets)))


@FUZZ
@given(data=st.one_of(config_dicts(), st.dictionaries(keys, values, max_size=5)), sets=overrides)
def test_build_config_never_crashes(data, sets):
    _valid_or_clear_error(lambda: build_config(TrainConfig, apply_overrides(data, sets)))


@FUZZ
@given(data=values)
def test_build_config_rejects_non_mappings_clearly(data):
    """Anything at all where a config belongs: a mapping that validates, or a CtrlDiffError."""
    _valid_or_clear_error(lambda: build_config(TrainConfig, data))


@settings(max_examples=60, deadline=timedelta(seconds=5), derandomize=True, database=None)
@given(path=st.sampled_from(PATHS), value=yaml_values)
def test_a_single_override_is_applied_or_named(path, value):
    cfg = _valid_or_clear_error(lambda: build_train_config(None, None, {}, [f"{path}={value}"]))
    if cfg is None:
        return
    node = cfg
    for part in path.split("."):
        node = getattr(node, part)  # the override landed where it said


@pytest.mark.parametrize("algo", ["ctrl", "ddpo", "ddpo-sf", "dpok"])
def test_default_configs_round_trip_through_config_yaml(algo, tmp_path):
    """The defaults must themselves be valid: a run's config.yaml is re-validated by --resume."""
    cfg = build_config(TrainConfig, {"algo": algo})
    dump_yaml(cfg, tmp_path / "config.yaml")
    assert load_run_config(tmp_path) == cfg


def test_adversarial_yaml_is_bounded(tmp_path):
    """A 'billion laughs' alias bomb, a self-referencing alias and very deep nesting: an answer, fast."""
    bomb = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    bomb += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    docs = {"bomb": "\n".join(bomb) + "\nmodel: *a8\nsampler: *a8\n",
            "selfref": "sampler: &s [*s]\nmodel: &m [*m]\n",
            "deep": "sampler: " + "{a: " * 600 + "1" + "}" * 600 + "\n"}
    for name, text in docs.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        t0 = time.perf_counter()
        with _time_limit(HARD_LIMIT_S), pytest.raises(CtrlDiffError) as e:
            build_train_config(None, str(tmp_path / f"{name}.yaml"), {}, [])
        assert time.perf_counter() - t0 < 5 and "\n" not in str(e.value) and len(str(e.value)) < 2000, name


def test_deep_override_and_odd_keys_are_clear_errors():
    for sets in (["seed=" + "[" * 600 + "]" * 600], ["sampler={" + "a: {" * 600 + "}" * 601],
                 ["a" * 10_000 + "=1"], ["sampler..steps=3"], ["=3"], [".=1"]):
        with _time_limit(HARD_LIMIT_S), pytest.raises(CtrlDiffError) as e:
            build_train_config(None, None, {}, sets)
        assert "\n" not in str(e.value)
    with pytest.raises(CtrlDiffError, match="Keys should be strings"):
        build_config(TrainConfig, {1: 2})
    deep: dict = {}
    node = deep
    for _ in range(3000):
        node["sampler"] = {}
        node = node["sampler"]
    with _time_limit(HARD_LIMIT_S), pytest.raises(CtrlDiffError):
        build_config(TrainConfig, deep)


@pytest.mark.parametrize("field,value", [("beta", float("inf")), ("optim.lr", float("inf")), ("beta", float("nan")),
                                         ("sampler.eta", float("-inf")), ("ctrl.clip", float("nan"))])
def test_nan_and_inf_are_rejected_naming_the_field(field, value):
    with pytest.raises(CtrlDiffError, match=f"{field}: Input should be a finite number"):
        build_config(TrainConfig, _nested(field, value))


def _nested(path: str, value) -> dict:
    d: dict = {}
    node = d
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return d


@pytest.mark.parametrize("value", ["!!float abc", "!!int x", "!!bool x", "!!timestamp 1", "2001-13-45"])
def test_values_pyyaml_cannot_construct(value, tmp_path):
    """An override value PyYAML fails to construct is a plain string (so the field check names it), and the
    same value in a config file is a clear 'not valid YAML' error -- not a ValueError traceback."""
    with pytest.raises(CtrlDiffError, match="seed: Input should be a valid integer"):
        build_train_config(None, None, {}, [f"seed={value}"])
    assert build_train_config(None, None, {}, [f"reward={value}"]).reward == value
    (tmp_path / "c.yaml").write_text(f"seed: {value}\n")
    with pytest.raises(CtrlDiffError, match="not valid YAML"):
        load_yaml(tmp_path / "c.yaml")


def test_load_yaml_errors_are_clear(tmp_path):
    (tmp_path / "d.yaml").mkdir()
    for content, msg in [(None, "not found"), (b"\x80\x81", "not a text"), (b"[1, 2]", "mapping"),
                         (b"a: [", "not valid YAML"), (b"!!float 1\n[1, 2]", "not valid YAML")]:
        p = tmp_path / ("missing.yaml" if content is None else f"f{len(msg)}.yaml")
        if content is not None:
            p.write_bytes(content)
        with pytest.raises(CtrlDiffError, match=msg):
            load_yaml(p)
    with pytest.raises(CtrlDiffError, match="cannot read config file"):
        load_yaml(tmp_path / "d.yaml")
