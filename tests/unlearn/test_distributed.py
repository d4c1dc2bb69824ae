"""distributed=fsdp: the same run in two processes (gloo, CPU, torchrun) writes the same record as
in one process with distributed=none; and the memory options' config errors and record keys."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, compose_config

from mansu.config import ConfigError
from mansu.unlearn.sharding import check_memory_options, unlearn_with_memory_options

RUN = ["method=npo", "method.max_steps=4", "method.stop_forget_acc=null", "method.lr=3e-3",
       "attribution=none", "eval.cache=false", "eval.bootstrap_iters=20", "cpu_threads=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def numbers(record: dict, prefix: str = "") -> dict[str, float]:
    """Every number of the record's metrics, flattened."""
    out = {}
    items = record.items() if isinstance(record, dict) else enumerate(record)
    for key, value in items:
        name = f"{prefix}.{key}"
        if isinstance(value, (dict, list)):
            out.update(numbers(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def test_fsdp_on_two_processes_gives_the_one_process_record(tiny, session_cache, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    common = [*TINY, f"cache_dir={session_cache}", *RUN]
    single = subprocess.run([sys.executable, "-m", "mansu", *common, "distributed=none",
                             f"hydra.run.dir={tmp_path}/single"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              f"--master_port={free_port()}", "-m", "mansu", *common,
                              "distributed=fsdp", f"hydra.run.dir={tmp_path}/rank${{oc.env:RANK}}"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    one = json.loads((tmp_path / "single" / "result.json").read_text())
    for rank in (0, 1):
        two = json.loads((tmp_path / f"rank{rank}" / "result.json").read_text())
        assert two["status"] == "ok" and two["metrics"]["unlearning"]["world_size"] == 2
        assert two["metrics"]["unlearning"]["distributed"] == "fsdp"
        a, b = numbers(one["metrics"]), numbers(two["metrics"])
        assert set(a) - {".unlearning.world_size"} == set(b) - {".unlearning.world_size"}
        assert len(set(one["metrics"]["unlearning"]["losses"])) > 1  # it trained
        for key in a:
            if key != ".unlearning.world_size":
                assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-5), (key, a[key], b[key])


def test_mansu_refuses_sharding_and_bad_values_fail_in_one_line():
    with pytest.raises(ConfigError, match="MANSU is not sharded"):
        check_memory_options(compose_config(["method=mansu", "distributed=fsdp"]))
    with pytest.raises(ConfigError, match="distributed: expected one of none, fsdp"):
        check_memory_options(compose_config(["distributed=ddp"]))
    with pytest.raises(ConfigError, match="optimizer: expected one of"):
        check_memory_options(compose_config(["optimizer=sgd"]))


def run_ga(tiny, session_cache, overrides: list[str]):
    import copy

    from hydra.utils import instantiate

    from mansu.context import RunContext

    benchmark, model, tokenizer = tiny
    cfg = compose_config(["method.max_steps=3", "method.stop_forget_acc=null", *overrides],
                         cache_dir=session_cache)
    model = copy.deepcopy(model)
    torch.manual_seed(0)
    return unlearn_with_memory_options(instantiate(cfg.method), model, tokenizer, benchmark.forget,
                                       benchmark.retain, RunContext(cache_dir=session_cache), cfg)


def test_checkpointing_and_8bit_adamw_are_named_in_the_record(tiny, session_cache):
    plain = run_ga(tiny, session_cache, [])
    checkpointed = run_ga(tiny, session_cache, ["gradient_checkpointing=true"])
    eight_bit = run_ga(tiny, session_cache, ["optimizer=adamw_8bit"])
    assert plain.info["optimizer"] == "adamw" and not plain.info["gradient_checkpointing"]
    assert checkpointed.info["gradient_checkpointing"] and eight_bit.info["optimizer"] == "adamw_8bit"
    # Recomputing activations changes memory, not the result.
    torch.testing.assert_close(torch.tensor(checkpointed.losses), torch.tensor(plain.losses))
    for (name, p), q in zip(plain.model.named_parameters(), checkpointed.model.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert not checkpointed.model.is_activation_checkpointing  # switched off after the stage
    assert eight_bit.losses[0] == pytest.approx(plain.losses[0])  # same start, own steps
