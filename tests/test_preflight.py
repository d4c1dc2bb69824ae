"""mansu.preflight: the estimate against measured CPU peaks (tiny and ~100M random Llamas, each in
its own process), the printed report without loading weights, the SLURM refusal, and the
architecture numbers of every model config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, compose_config

from mansu.preflight import architecture_of, estimate

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
M100 = ["model.hidden_size=768", "model.num_layers=12", "model.num_heads=12",
        "model.num_kv_heads=12", "model.intermediate_size=2048", "model.vocab_size=8000"]
TINY_RUN = ["method.batch_size=4", "method.max_length=64", "method.max_steps=2"]


@pytest.mark.parametrize("overrides", [
    ["method=ga", "storage=fp32", *TINY_RUN],
    ["method=npo", "storage=fp32", *TINY_RUN],
    ["method=graddiff", "storage=bf16_master", *TINY_RUN],
    ["method=ga", "storage=bf16", "gradient_checkpointing=true", *TINY_RUN],
    ["method=ga", "storage=fp32", "optimizer=adamw_8bit", *TINY_RUN],
    ["method=ga", "storage=fp32", "method.batch_size=1", "method.max_length=64",
     "method.max_steps=2", *M100],
    ["method=npo", "storage=fp32", "method.batch_size=1", "method.max_length=64",
     "method.max_steps=2", *M100],
], ids=["tiny-ga", "tiny-npo", "tiny-graddiff-bf16master", "tiny-ga-checkpointing",
        "tiny-ga-8bit", "100m-ga", "100m-npo"])
def test_estimate_is_within_25_percent_of_the_measured_peak(overrides):
    out = subprocess.run([sys.executable, "scripts/measure_peaks.py", "model=tiny", *overrides],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.75 <= result["ratio"] <= 1.25, result


def test_every_model_config_has_architecture_numbers():
    for path in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        arch, source = architecture_of(compose_config([f"model={path.stem}"], tiny=False).model)
        assert arch.parameters > 0 and source, path.name
    llama, _ = architecture_of(compose_config(["model=llama3_1_8b_instruct"], tiny=False).model)
    assert abs(llama.parameters - 8_030_261_248) < 1e6  # Llama-3.1-8B's published size


def test_sharding_divides_the_training_state_and_mansu_is_not_sharded():
    base = ["experiment=paper_main_table", "method=npo", "distributed=fsdp"]
    one = estimate(compose_config(base, tiny=False), gpus=1)
    two = estimate(compose_config(base, tiny=False), gpus=2)
    unlearn = {e: next(s for s in est.stages if s.name == "unlearn") for e, est in
               (("one", one), ("two", two))}
    for part in ("weights", "optimizer state", "frozen reference"):
        assert unlearn["two"].parts[part] == pytest.approx(unlearn["one"].parts[part] / 2)
    mansu = estimate(compose_config(["experiment=paper_main_table", "method=mansu"], tiny=False),
                     gpus=2)
    assert next(s for s in mansu.stages if s.name == "unlearn").parts["weights"] == \
        unlearn["one"].parts["weights"]


def test_preflight_prints_each_stage_without_loading_weights():
    # HF_HUB_OFFLINE with no local Llama: any attempt to load would fail.
    out = subprocess.run([sys.executable, "-m", "mansu", "preflight=true",
                          "experiment=paper_main_table", "method=npo"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for stage in ("evaluate_theta0", "quantize_theta0", "unlearn", "noise_control", "cad",
                  "frozen reference", "θ0 on CPU", "peak per GPU"):
        assert stage in out.stdout


def test_slurm_sweep_that_cannot_fit_is_refused_before_submission(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mansu", "-m", "hydra/launcher=slurm",
                          "experiment=paper_main_table", "cluster.gpu_memory_gb=40",
                          f"hydra.sweep.dir={tmp_path}/sweep"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "refusing to submit" in out.stderr and "method=npo seed=2" in out.stderr
    assert not (tmp_path / "sweep").exists() or not any((tmp_path / "sweep").rglob("*.pkl"))
