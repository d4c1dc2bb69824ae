"""scripts/make_tables.py and scripts/plot_sweep.py on a hand-made sweep folder: the numbers they
print are the records' numbers, means over seeds, and the headline figure is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import make_tables  # noqa: E402
import plot_sweep  # noqa: E402


def record(method: str, seed: int, forget_u: float, updated: float) -> dict:
    split = {"forget": {"accuracy": forget_u}, "retain": {"accuracy": 0.9}}
    accuracy = {"theta0": {"forget": {"accuracy": 1.0}, "retain": {"accuracy": 1.0}},
                "thetau": split, "q_theta0": {"forget": {"accuracy": 1.0},
                                              "retain": {"accuracy": 1.0}},
                "q_thetau": {"forget": {"accuracy": forget_u + 0.25}, "retain": {"accuracy": 0.9}}}
    return {"status": "ok", "choices": {"model": "m", "benchmark": "b", "method": method},
            "config": {"method": {"lr": 1e-3 * (seed + 1)}},
            "storage": "bf16", "quantizer": "nf4", "seed": seed,
            "metrics": {"accuracy": accuracy, "noise_control": {"value": 0.0},
                        "unlearning": {"updated": {"share_of_quantized": updated}},
                        "cad": {"cad_minus_floor": 0.1}},
            "verdicts": {"forgetting": {"holds": True},
                         "quantization_permanence": {"holds": False}}}


@pytest.fixture
def sweep(tmp_path) -> Path:
    for i, (method, seed, forget_u, updated) in enumerate(
            [("ga", 0, 0.5, 0.03), ("ga", 1, 0.25, 0.05), ("mansu", 0, 0.5, 0.001)]):
        folder = tmp_path / f"{i}_{method}_seed{seed}"
        folder.mkdir()
        (folder / "result.json").write_text(json.dumps(record(method, seed, forget_u, updated)))
        # Four questions; Q(θu) answers one more of them than θu did.
        (folder / "predictions.json").write_text(json.dumps(
            {"thetau": {"forget": [1, 0, 0, 0]}, "q_thetau": {"forget": [1, 1, 0, 0]}}))
    return tmp_path


def test_brief_table_puts_methods_side_by_side_with_seed_means(sweep, capsys):
    assert make_tables.main([str(sweep), "--brief"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ga", "mansu"]
    rows = {line[:24].strip(): line[24:].split() for line in lines[1:]}
    assert rows["forget θ0"] == ["1.000", "1.000"]
    assert rows["forget θu"] == ["0.375", "0.500"]  # ga: the mean of its two seeds
    assert rows["forget Q(θu)"] == ["0.625", "0.750"]
    assert rows["updated share"] == ["0.0400", "0.0010"]
    assert rows["PTQ gap"][:1] == ["+0.250"]  # one question in four, both seeds
    assert rows["quantization_permanence"] == ["FAILS", "FAILS"]
    assert (sweep / "table.csv").is_file()


def test_by_splits_rows_by_a_config_key(sweep, capsys):
    """A tuning sweep: --by method.lr gives one row per (method, lr), not a mean over lrs."""
    assert make_tables.main([str(sweep), "--by", "method.lr"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]
    assert [(r["method"], r["method.lr"], r["seeds"], r["forget θu"]) for r in rows] == [
        ("ga", "0.001", "1", "0.500"), ("ga", "0.002", "1", "0.250"), ("mansu", "0.001", "1", "0.500")]
    with pytest.raises(SystemExit):
        make_tables.main([str(sweep), "--by", "method.lrr"])
    assert "no record's config has 'method.lrr'" in capsys.readouterr().err


def test_columns_picks_and_orders_what_is_printed(sweep, capsys):
    assert make_tables.main([str(sweep), "--columns", "forget Q(θu),forgetting,forget θu"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "method", "seeds", "forget Q(θu)", "forgetting", "forget θu"]
    with pytest.raises(SystemExit):  # a misspelt column is an error naming it, not a silent drop
        make_tables.main([str(sweep), "--columns", "forget Qu"])
    assert "no column 'forget Qu'" in capsys.readouterr().err


def test_headline_figure_is_written(sweep):
    assert plot_sweep.main([str(sweep)]) == 0
    assert (sweep / "headline.png").stat().st_size > 10_000


def test_a_verdict_held_in_some_seeds_says_in_how_many(sweep, capsys):
    first = sweep / "0_ga_seed0" / "result.json"
    held = json.loads(first.read_text())
    held["verdicts"]["quantization_permanence"]["holds"] = True
    first.write_text(json.dumps(held))
    assert make_tables.main([str(sweep), "--brief"]) == 0
    rows = {line[:24].strip(): line[24:].split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["quantization_permanence"] == ["holds", "1/2", "FAILS"]
    assert rows["forgetting"] == ["holds", "holds"]
    assert make_tables.main([str(sweep)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ga")]
    assert table[0].split(" | ")[-1] == "1/2 |"


def test_permanence_is_judged_once_over_every_seeds_questions(tmp_path):
    """Two seeds of 10 questions, each forgetting all and bringing 1 back under NF4 (share 0.1):
    the table's verdict is mansu.verdicts' over both seeds' 20 questions as one sample, not a
    vote of the seeds' own verdicts."""
    from mansu.verdicts import permanence_verdict

    forget = {"theta0": [1] * 10, "thetau": [0] * 10, "q_theta0": [1] * 10,
              "q_thetau": [1] + [0] * 9}
    for seed in (0, 1):
        folder = tmp_path / f"ga_seed{seed}"
        folder.mkdir()
        rec = record("ga", seed, 0.0, 0.03)
        rec["verdicts"]["quantization_permanence"] = {"holds": None, "outcome": "inconclusive"}
        rec["config"]["eval"] = {"min_forgetting": 0.1, "max_share_back": 0.25}
        (folder / "result.json").write_text(json.dumps(rec))
        (folder / "predictions.json").write_text(json.dumps(
            {model: {"forget": answers} for model, answers in forget.items()}))
    records, _ = make_tables.load_records(tmp_path)
    pooled = make_tables.pooled_permanence(records)
    arrays = {k: np.asarray(v * 2, dtype=float) for k, v in forget.items()}
    resamples = np.random.default_rng(0).integers(0, 20, size=(2000, 20))
    assert pooled == permanence_verdict(arrays, resamples, 0.1, 0.25, {"value": 0.0})
    assert pooled["value"] == pytest.approx(0.1) and pooled["forgetting"] == 1.0
    table = make_tables.build_table(records)
    assert table.loc[0, "permanence"] == pooled["outcome"]
    assert table.loc[0, "v:quantization_permanence"] == pooled["holds"]
