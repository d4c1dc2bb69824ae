"""The launcher end to end on the tiny config: the record, resume, failures that lose nothing."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, compose_config, mansu_cli

from mansu import cli
from mansu import run as launcher

FAST = ["method=ga", "method.max_steps=8", "method.batch_size=8"]


def run_tiny(tmp_path, session_cache, overrides=(), name="run"):
    cfg = compose_config([*FAST, *overrides], cache_dir=session_cache)
    return cli.run_guarded(cfg, tmp_path / name)


def test_record_has_every_metric_of_the_four_models(tmp_path, session_cache, tiny):
    record = run_tiny(tmp_path, session_cache, ["seed=3"])
    on_disk = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == on_disk["status"] == "ok"
    acc = on_disk["metrics"]["accuracy"]
    assert set(acc) == {"theta0", "thetau", "q_theta0", "q_thetau"}
    for model in acc.values():
        for split in ("forget", "retain"):
            r = model[split]
            assert 0 <= r["ci_low"] <= r["accuracy"] <= r["ci_high"] <= 1 and r["n"] > 0
    assert acc["theta0"]["forget"]["accuracy"] >= 0.95  # the injected facts are known
    gap = on_disk["metrics"]["ptq_gap"]
    assert gap["value"] == pytest.approx(acc["q_thetau"]["forget"]["accuracy"]
                                         - acc["thetau"]["forget"]["accuracy"])
    diag = on_disk["metrics"]["diagnostics"]
    assert diag["n_moved"] > 0 and diag["bin_update_ratio_median"] > 0
    assert set(on_disk["verdicts"]) == {"forgetting", "retain_preservation",
                                        "quantization_permanence", "structural_erasure"}
    assert set(on_disk["verdicts_point"]) == set(on_disk["verdicts"])  # the first rule, beside
    assert on_disk["verdicts"]["forgetting"]["model"] == "q_thetau"
    assert on_disk["verdicts"]["quantization_permanence"]["outcome"] in (
        "holds", "reversal", "inconclusive", "nothing to keep")
    parts = on_disk["data"]
    assert set(parts) == {"forget", "retain_train", "retain_fit", "retain_eval"}
    assert parts["retain_eval"]["questions"] == acc["theta0"]["retain"]["n"]
    assert sum(parts[k]["questions"] for k in ("retain_train", "retain_fit", "retain_eval")) == 24
    assert len({parts[k]["fingerprint"] for k in parts}) == 4
    assert on_disk["storage"] == "fp32" and on_disk["seed"] == 3
    assert on_disk["environment"]["packages"]["bitsandbytes"]
    assert set(on_disk["timings"]) >= {"load", "unlearn", "evaluate_theta0", "quantize_thetau"}
    assert (tmp_path / "run" / "unlearned.safetensors").is_file()
    predictions = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert len(predictions["thetau"]["forget"]) == acc["thetau"]["forget"]["n"]


def test_rerun_resumes_from_cached_stages(tmp_path, session_cache, tiny, monkeypatch):
    first = run_tiny(tmp_path, session_cache, ["seed=11"], name="first")

    import functools

    import baselines.ga

    @functools.wraps(baselines.ga.unlearn)  # same signature, so the config still validates
    def must_not_train(*args, **kwargs):
        raise AssertionError("the method ran again instead of reusing its cached result")

    monkeypatch.setattr(baselines.ga, "unlearn", must_not_train)
    second = run_tiny(tmp_path, session_cache, ["seed=11"], name="second")
    assert second["status"] == "ok"
    assert second["metrics"]["accuracy"] == first["metrics"]["accuracy"]


def test_failed_job_keeps_what_it_measured_and_rerun_finishes(tmp_path, session_cache, tiny,
                                                               monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash in the diagnostics stage")

    monkeypatch.setattr(launcher, "reversal_stages", crash)
    cfg = compose_config([*FAST, "seed=21"], cache_dir=session_cache)
    record = cli.run_guarded(cfg, tmp_path / "crashed", multirun=True)
    saved = json.loads((tmp_path / "crashed" / "result.json").read_text())
    assert record["status"] == saved["status"] == "failed"
    assert "simulated crash" in saved["error"]
    assert saved["metrics"]["accuracy"]["thetau"]["forget"]["n"] > 0  # measured before the crash
    monkeypatch.undo()
    again = cli.run_guarded(cfg, tmp_path / "rerun")
    assert again["status"] == "ok"
    assert again["metrics"]["unlearning"] == saved["metrics"]["unlearning"]


def test_nan_during_unlearning_is_recorded_as_diverged_with_theta0_kept(tmp_path, session_cache,
                                                                        tiny):
    record = cli.run_guarded(compose_config(
        [*FAST, "method.lr=1e30", "attribution=none", "seed=31"], cache_dir=session_cache),
        tmp_path / "nan", multirun=True)
    saved = json.loads((tmp_path / "nan" / "result.json").read_text())
    assert record["status"] == saved["status"] == "diverged"
    assert "UnlearningDiverged" in saved["error"] and "step" in saved["error"]
    assert saved["metrics"]["accuracy"]["theta0"]["forget"]["accuracy"] >= 0.95


def test_single_run_error_is_one_clear_line(tmp_path, session_cache):
    cfg = compose_config(["method=ga", "method.lr=abc"], cache_dir=session_cache)
    with pytest.raises(SystemExit, match=r"mansu: error: method\.lr: expected float, got 'abc'"):
        cli.run_guarded(cfg, tmp_path / "bad")
    assert json.loads((tmp_path / "bad" / "result.json").read_text())["status"] == "failed"


def test_malformed_benchmark_file_names_the_line(tmp_path, session_cache):
    bad = tmp_path / "forget.jsonl"
    bad.write_text('{"question": "Q", "choices": ["a", "b", "c", "d"], "answer": 0}\n{oops\n')
    cfg = compose_config(["benchmark=local_jsonl", f"benchmark.forget_path={bad}",
                          f"benchmark.retain_path={bad}"], cache_dir=session_cache)
    with pytest.raises(SystemExit, match=r"forget\.jsonl:2: "):
        cli.run_guarded(cfg, tmp_path / "badfile")


@pytest.mark.parametrize("args,message", [
    (["method.lr=abc"], "method.lr: expected float, got 'abc'"),
    (["nosuchkey=1"], "Key 'nosuchkey' is not in struct"),
    (["model=nosuch"], "Could not find 'model/nosuch'"),
])
def test_cli_bad_input_fails_with_a_clear_message(tmp_path, args, message):
    out = mansu_cli(args, tmp_path / "outputs", timeout=120)
    assert out.returncode != 0
    assert message in out.stderr + out.stdout
    assert "Traceback" not in out.stderr


def test_multirun_one_failing_job_does_not_stop_the_others(tmp_path, session_cache, tiny):
    out = mansu_cli(["-m", *TINY, f"cache_dir={session_cache}", "method=ga", "attribution=none",
                     "method.batch_size=8", "method.max_steps=2,abc", "seed=0,1"],
                    tmp_path / "outputs")
    assert out.returncode != 0  # a sweep that lost jobs says so (mansu.cli.Safeguards)
    assert "2 of 4 jobs ok" in out.stderr
    records = [json.loads(p.read_text()) for p in (tmp_path / "outputs").rglob("result.json")]
    assert sorted(r["status"] for r in records) == ["failed", "failed", "ok", "ok"]
    assert len({r["run_dir"] for r in records}) == 4  # one folder per job


def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path, session_cache, tiny):
    out = mansu_cli(["-m", "hydra/launcher=local", *TINY, f"cache_dir={session_cache}",
                     "attribution=none", "eval.noise_control=false", "method=none,ga"],
                    tmp_path / "outputs")
    assert out.returncode == 0, out.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "outputs").rglob("result.json")]
    assert sorted(r["choices"]["method"] for r in records) == ["ga", "none"]
    assert all(r["status"] == "ok" for r in records)


def test_wandb_offline_writes_its_run_files(tmp_path, session_cache, tiny, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    record = run_tiny(tmp_path, session_cache, ["logger=wandb", "attribution=none", "seed=5"])
    assert record["status"] == "ok"
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())
