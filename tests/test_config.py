"""Every config in every group composes, validates against its code, and instantiates; bad keys
and values fail with one line naming them."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONF_DIR, compose_config
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from mansu.config import ConfigError, fits, validate, validate_node

GROUPS = ["model", "benchmark", "method", "quantizer", "attribution", "eval", "logger"]
# Model and benchmark options are built by the tests that provide what they need: the tiny model in
# conftest.py, SmolLM2 and the hub models (offline refusal) in test_models.py, the benchmarks in
# test_benchmarks.py and test_real_benchmarks.py.
# Keys an option leaves for the user to fill (`???`); any value of the right type composes.
REQUIRED = {("benchmark", "local_jsonl"): ["benchmark.forget_path=f.jsonl",
                                           "benchmark.retain_path=r.jsonl"]}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option):
    cfg = compose_config([f"{group}={option}", *REQUIRED.get((group, option), [])])
    validate(cfg)


def test_a_required_key_left_unset_is_named():
    with pytest.raises(ConfigError, match=r"benchmark\.forget_path: required but not set"):
        validate(compose_config(["benchmark=local_jsonl"]))


def test_defaults_list_reads_like_the_pipeline():
    text = (Path(CONF_DIR) / "config.yaml").read_text()
    order = [text.index(f"- {g}:") for g in GROUPS]
    assert order == sorted(order)


def test_every_config_file_opens_with_what_it_is_and_how_to_run_it():
    for path in Path(CONF_DIR).rglob("*.yaml"):
        lines = path.read_text().splitlines()
        assert lines and lines[0].startswith("#"), f"{path} does not open with a comment"
        opening = [line for line in lines[:next((i for i, line in enumerate(lines)
                                                 if not line.startswith("#")), len(lines))]]
        assert any("mansu" in line or "make " in line for line in opening), \
            f"{path}: the opening comment should give the command that uses it"


@pytest.mark.parametrize("option", options("method"))
def test_every_method_instantiates(option):
    fn = instantiate(compose_config([f"method={option}"]).method)
    assert callable(fn)


@pytest.mark.parametrize("option", options("quantizer") + [])
def test_every_quantizer_instantiates(option):
    assert callable(instantiate(compose_config([f"quantizer={option}"]).quantizer))


@pytest.mark.parametrize("option", options("logger"))
def test_every_logger_instantiates(option):
    tracker = instantiate(compose_config([f"logger={option}"]).logger)
    assert hasattr(tracker, "log_record")


@pytest.mark.parametrize("option", options("attribution"))
def test_every_attribution_setting_instantiates(option):
    settings = instantiate(compose_config([f"attribution={option}"]).attribution)
    assert settings.enabled == (option != "none")


def test_eval_settings_instantiate():
    settings = instantiate(compose_config().eval)
    assert settings.bootstrap_iters == 50 and settings.min_forgetting == 0.10


def test_wrong_type_names_key_and_value():
    cfg = compose_config(["method.lr=abc"])
    with pytest.raises(ConfigError, match=r"method\.lr: expected float, got 'abc'"):
        validate(cfg)


def test_unknown_key_in_group_suggests_close_match():
    cfg = compose_config(["+method.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"method\.lrr: unknown key .*did you mean 'lr'"):
        validate(cfg)


def test_unknown_top_level_key_is_refused_by_hydra():
    with pytest.raises(ConfigCompositionException, match="nosuchkey"):
        compose_config(["nosuchkey=1"])


def test_unknown_option_lists_available_ones():
    with pytest.raises(Exception, match="(?s)nosuch.*Available options.*tiny"):
        compose_config(["model=nosuch"])


def test_tuning_resizes_a_method_for_the_tiny_model_and_command_line_wins():
    assert compose_config(["method=ga"]).method.lr == pytest.approx(1e-4)
    assert compose_config(["method=ga", "method.lr=0.5"]).method.lr == 0.5


def test_fits_covers_the_hint_shapes_knobs_use():
    from typing import Literal

    assert fits(3, float) and not fits("3", float) and not fits(True, int)
    assert fits(None, int | None) and fits(2, int | None) and not fits(2.5, int | None)
    assert fits(["a", "b"], list[str]) and not fits([1], list[str])
    assert fits("nf4", Literal["nf4", "fp4"]) and not fits("int3", Literal["nf4", "fp4"])


def test_missing_required_knob_is_named(tmp_path):
    from omegaconf import OmegaConf

    node = OmegaConf.create({"_target_": "mansu.benchmarks.local_jsonl.build",
                             "retain_path": "x"})
    with pytest.raises(ConfigError, match="forget_path: required"):
        validate_node(node, "benchmark")


@pytest.mark.parametrize("option", options("experiment"))
def test_every_experiment_composes_and_validates(option):
    validate(compose_config([f"experiment={option}"], tiny=False))
