"""The record's arithmetic (paired bootstrap, verdicts) and its atomic writes."""

from __future__ import annotations

import json

import pytest

from mansu.io import record as rec
from mansu.stats import paired_bootstrap
from mansu.verdicts import point_verdicts


def test_paired_bootstrap_value_and_degenerate_interval():
    before = [True, True, False, False]
    after = [True, True, True, False]
    out = paired_bootstrap(before, after, iters=200, seed=0)
    assert out["value"] == pytest.approx(0.25)
    assert out["ci_low"] <= 0.25 <= out["ci_high"]
    same = paired_bootstrap(before, before, iters=200, seed=0)
    assert same == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_paired_bootstrap_refuses_unpaired_lists():
    with pytest.raises(ValueError, match="same questions"):
        paired_bootstrap([True], [True, False])


def metrics(f0, fu, r0, ru, gap=None, cad=None):
    acc = {"theta0": {"forget": {"accuracy": f0}, "retain": {"accuracy": r0}},
           "thetau": {"forget": {"accuracy": fu}, "retain": {"accuracy": ru}}}
    out = {"accuracy": acc}
    if gap is not None:
        out["ptq_gap"] = {"value": gap}
    if cad is not None:
        out["cad"] = {"cad_minus_floor": cad}
    return out


THRESHOLDS = dict(min_forgetting=0.10, max_retain_drop=0.03, max_ptq_gap=0.0,
                  min_cad_over_floor=0.5)


def test_verdicts_and_margins_by_hand():
    v = point_verdicts(metrics(0.9, 0.3, 0.95, 0.94, gap=0.05, cad=0.7), **THRESHOLDS)
    assert v["forgetting"]["holds"] and v["forgetting"]["margin"] == pytest.approx(0.5)
    assert v["retain_preservation"]["holds"] and v["retain_preservation"]["margin"] == pytest.approx(0.02)
    assert not v["quantization_permanence"]["holds"]
    assert v["quantization_permanence"]["margin"] == pytest.approx(-0.05)
    assert v["structural_erasure"]["holds"] and v["structural_erasure"]["margin"] == pytest.approx(0.2)


def test_unmeasured_property_is_never_a_pass():
    v = point_verdicts(metrics(0.9, 0.3, 0.95, 0.95), **THRESHOLDS)
    assert v["quantization_permanence"]["holds"] is None
    assert v["structural_erasure"]["holds"] is None


def test_atomic_write_leaves_old_record_when_killed_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    rec.atomic_write_json(path, {"status": "ok", "n": 1})

    def dies_halfway(obj, f, **kw):
        f.write('{"status": "ok", "n"')
        raise KeyboardInterrupt  # what a SIGINT/kill looks like from inside the process

    monkeypatch.setattr(rec.json, "dump", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        rec.atomic_write_json(path, {"status": "ok", "n": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"status": "ok", "n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_environment_names_versions_and_commit():
    env = rec.environment()
    assert env["packages"]["torch"] and env["packages"]["bitsandbytes"]
    assert "commit" in env["git"]


def test_summary_table_prints_four_models_and_verdicts():
    r = {"quantizer": "nf4", "metrics": {
        "accuracy": {k: {"forget": {"accuracy": 0.5}, "retain": {"accuracy": 0.9}}
                     for k in ("theta0", "thetau", "q_theta0", "q_thetau")},
        "ptq_gap": {"value": 0.02, "ci_low": -0.01, "ci_high": 0.05}},
        "verdicts": point_verdicts(metrics(0.9, 0.3, 0.95, 0.94, gap=0.02), **THRESHOLDS)}
    table = rec.summary_table(r)
    assert "Q(θu)" in table and "PTQ gap (nf4): +0.020" in table and "not measured" in table
