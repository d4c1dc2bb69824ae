"""Faults a careful user meets (issue 13), each reproduced on the tiny config and asserted: cache
entries that are missing a file, truncated or planted; two runs started together; a full disk at
the end; run artifacts that must not follow the cache; bad input that must give one clear line."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, compose_config, mansu_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mansu import cli
from mansu import run as launcher
from mansu.attribution.circuit import Circuit
from mansu.attribution.eap_ig import Attribution, MeanBaseline
from mansu.data import MCQ, BenchmarkFileError, read_mcq_jsonl
from mansu.io.cache import StageCache, decode, encode
from mansu.io.safeguards import SetupError, check_free_disk, claim_run_dir

# The smallest whole run: a few steps of GA, no attribution or noise control.
CHEAP = ["attribution=none", "eval.noise_control=false", "eval.first_order=false"]
SMALL = ["method=ga", "method.max_steps=4", "method.batch_size=8", *CHEAP]
GOOD_ROW = {"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 1}


def can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not can_mount(), reason="needs `unshare -m` and tmpfs mounts")


# --- cache entries ------------------------------------------------------------------------------


def corrupt(entry: Path, how: str) -> None:
    tensors = entry / "tensors.safetensors"
    if how == "tensor file deleted":
        tensors.unlink()
    elif how == "tensor file truncated":
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    elif how == "one byte flipped":
        data = bytearray(tensors.read_bytes())
        data[-1] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif how == "manifest deleted":
        (entry / "manifest.json").unlink()
    elif how == "value json edited":
        (entry / "value.json").write_text("{}")


@pytest.mark.parametrize("how", ["tensor file deleted", "tensor file truncated", "one byte flipped",
                                 "manifest deleted", "value json edited"])
def test_a_damaged_entry_is_discarded_with_one_warning_and_recomputed(tmp_path, caplog, how):
    cache = StageCache(tmp_path)
    value = {"info": {"steps": 3}, "changed": {"w": torch.arange(6.0).reshape(2, 3)}}
    cache.objects("unlearn", "k", lambda: value)
    corrupt(cache.entry("unlearn", "k"), how)
    calls = []
    with caplog.at_level(logging.WARNING, logger="mansu.io.cache"):
        again = cache.objects("unlearn", "k", lambda: calls.append(1) or value)
    assert calls == [1]  # recomputed, not half used
    torch.testing.assert_close(again["changed"]["w"], value["changed"]["w"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(cache.entry("unlearn", "k")) in warnings[0]
    assert "\n" not in warnings[0]
    assert cache.objects("unlearn", "k", lambda: pytest.fail("recomputed a sound entry")) is not None


def test_a_cache_that_is_off_is_neither_read_nor_written(tmp_path):
    StageCache(tmp_path).json("eval", "k", lambda: {"old": True})
    off = StageCache(tmp_path, enabled=False)
    assert off.json("eval", "k", lambda: {"new": True}) == {"new": True}
    assert off.json("eval", "k2", lambda: {"new": True}) and not (tmp_path / "eval" / "k2").exists()


def test_attributions_and_circuits_round_trip_as_tensors_and_json(tmp_path):
    heads, neurons = torch.randn(2, 4), torch.randn(2, 3)
    attr = Attribution(heads, neurons, torch.randn(5), torch.randn(5), "cloze", "mean", 8, 5, "x",
                       baseline=MeanBaseline(torch.randn(16), {("mlp", 0): torch.randn(3)}))
    circuit = Circuit(heads > 0, neurons > 0, 8, curve=[(3, 0.5), (5, 0.9)], faithfulness=0.9,
                      threshold=0.8)
    value = {"forget_items": [MCQ("Q?", ("a", "b"), 1)], "mean_items": None, "forget": attr,
             "circuit": circuit, "parameter_share": 0.25, "noise_floor": float("nan")}
    cache = StageCache(tmp_path)
    cache.objects("attribution", "k", lambda: value)
    back = cache.objects("attribution", "k", lambda: pytest.fail("not reused"))
    assert back["forget_items"] == value["forget_items"]
    assert back["circuit"].curve == [(3, 0.5), (5, 0.9)] and back["circuit"].to_json() == circuit.to_json()
    assert torch.equal(back["circuit"].heads, circuit.heads) and back["circuit"].heads.dtype == torch.bool
    torch.testing.assert_close(back["forget"].flat(), attr.flat())
    torch.testing.assert_close(back["forget"].baseline.acts[("mlp", 0)], attr.baseline.acts[("mlp", 0)])
    assert back["noise_floor"] != back["noise_floor"]  # NaN survives
    files = {p.name for p in cache.entry("attribution", "k").iterdir()}
    assert files == {"value.json", "tensors.safetensors", "manifest.json"}


def test_no_pickle_on_any_load_path():
    for path in [*(ROOT / "mansu").rglob("*.py"), *(ROOT / "baselines").rglob("*.py")]:
        source = path.read_text()
        for loader in ("torch.load(", "import pickle", "pickle.load", "weights_only=False"):
            assert loader not in source, f"{path}: {loader}"


def test_a_planted_entry_cannot_run_code(tmp_path, caplog):
    marker = tmp_path / "pwned"
    # A pickle payload where the old cache kept attributions is never read.
    (tmp_path / "attribution").mkdir()
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (tmp_path / "attribution" / "k.pt").write_bytes(payload)
    # An entry with a valid manifest naming a class outside the project is refused.
    cache = StageCache(tmp_path)
    cache.objects("attribution", "k", lambda: {"x": 1})
    entry = cache.entry("attribution", "k")
    planted = {"__dataclass__": "subprocess:Popen", "fields": {"args": ["touch", str(marker)]}}
    (entry / "value.json").write_text(json.dumps(planted))
    from mansu.io.cache import FORMAT, sha256_of
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_of(p)} for p in entry.iterdir()
             if p.name != "manifest.json"}
    (entry / "manifest.json").write_text(json.dumps({"format": FORMAT, "files": files}))
    with caplog.at_level(logging.WARNING, logger="mansu.io.cache"):
        assert cache.objects("attribution", "k", lambda: {"x": 2}) == {"x": 2}
    assert not marker.exists()
    assert "not a class of this project" in caplog.text


def test_a_run_with_a_damaged_unlearn_entry_retrains_and_copies_its_artifact(tmp_path, session_cache,
                                                                             tiny, caplog):
    cfg = compose_config([*SMALL, "seed=41"], cache_dir=session_cache)
    before = set((session_cache / "unlearn").glob("*/manifest.json"))
    first = cli.run_guarded(cfg, tmp_path / "first")
    entries = [p.parent for p in set((session_cache / "unlearn").glob("*/manifest.json")) - before]
    assert len(entries) == 1
    artifact = tmp_path / "first" / "unlearned.safetensors"
    size = artifact.stat().st_size
    assert artifact.stat().st_nlink == 1  # a copy, never a hard link into the cache
    (entries[0] / "tensors.safetensors").unlink()  # issue 13 case 2
    with caplog.at_level(logging.WARNING, logger="mansu.io.cache"):
        second = cli.run_guarded(cfg, tmp_path / "second")
    assert f"cache entry {entries[0]}" in caplog.text
    assert second["status"] == "ok"
    assert second["metrics"]["diagnostics"]["n_moved"] > 0  # θu really is θu, not θ0
    assert second["metrics"]["accuracy"] == first["metrics"]["accuracy"]
    (entries[0] / "tensors.safetensors").write_bytes(b"")  # a truncated cache file ...
    assert artifact.stat().st_size == size  # ... leaves a finished run's artifact alone


# --- run folders, disks, logging ----------------------------------------------------------------


def test_two_runs_started_together_get_folders_of_their_own(tmp_path, session_cache, tiny):
    args = [*TINY, f"cache_dir={session_cache}", *CHEAP, "method=none"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "MANSU_OUTPUTS": str(tmp_path)}
    jobs = [subprocess.Popen([sys.executable, "-m", "mansu", *args, f"seed={seed}"], env=env,
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for seed in (0, 1)]
    for job in jobs:
        assert job.wait(timeout=600) == 0, job.stderr.read()[-2000:]
    folders = sorted(p.parent for p in tmp_path.glob("runs/*/result.json"))
    assert len(folders) == 2
    for folder in folders:
        record = json.loads((folder / "result.json").read_text())
        assert f"seed: {record['seed']}\n" in (folder / ".hydra" / "config.yaml").read_text()
    assert sorted(json.loads((f / "result.json").read_text())["seed"] for f in folders) == [0, 1]


def test_a_folder_already_taken_is_refused_without_touching_it(tmp_path, session_cache):
    claim_run_dir(tmp_path / "run")
    with pytest.raises(SetupError, match="already used by another run"):
        claim_run_dir(tmp_path / "run")
    cfg = compose_config(SMALL, cache_dir=session_cache)
    with pytest.raises(SystemExit, match=r"mansu: error: run folder .* already used"):
        cli.run_guarded(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "result.json").exists()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_claim_left_by_a_dead_process_is_taken_over_and_another_hosts_is_not(tmp_path):
    import socket

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".mansu-run").write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    claim_run_dir(folder)  # the killed run's folder is this run's now
    assert json.loads((folder / ".mansu-run").read_text())["pid"] == os.getpid()
    assert [p.name for p in folder.iterdir()] == [".mansu-run"]
    (folder / ".mansu-run").write_text(json.dumps({"host": "another-node", "pid": 1}))
    with pytest.raises(SetupError, match=r"already used by another run .*delete .*\.mansu-run"):
        claim_run_dir(folder)


def test_a_finished_job_is_not_run_again_and_another_configs_folder_is_refused(tmp_path,
                                                                              session_cache,
                                                                              monkeypatch):
    cfg = compose_config(SMALL, cache_dir=session_cache)
    folder = tmp_path / "job"
    folder.mkdir()
    from omegaconf import OmegaConf

    finished = {"status": "ok", "seed": 0, "choices": {"method": "ga"}, "timings": {"unlearn": 1.0},
                "metrics": {"accuracy": {"theta0": {"forget": {"accuracy": 0.9}}}},
                "config": OmegaConf.to_container(cfg, resolve=True)}
    finished["config"]["output_root"] = "/elsewhere/outputs"  # the folder moved: same job
    (folder / "result.json").write_text(json.dumps(finished))
    monkeypatch.setattr(launcher, "run", lambda *a, **k: pytest.fail("a finished job ran again"))
    assert cli.run_guarded(cfg, folder, multirun=True) == finished
    assert not (folder / ".mansu-run").exists()  # released: the next rerun may look too

    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("what hydra wrote for the new job\n")
    other = compose_config([*SMALL, "method.lr=0.5", "seed=3"], cache_dir=session_cache)
    before = (folder / "result.json").read_bytes()
    with pytest.raises(SystemExit, match=r"holds a finished run of another config "
                                         r"\(method\.lr, seed differ\)"):
        cli.run_guarded(other, folder)
    assert (folder / "result.json").read_bytes() == before
    restored = OmegaConf.load(folder / ".hydra" / "config.yaml")
    assert restored.seed == cfg.seed and restored.method.lr == cfg.method.lr


def test_rerunning_a_sweep_resumes_its_crashed_job_and_keeps_the_rest(tmp_path, session_cache, tiny):
    import socket

    sweep = ["-m", *TINY, f"cache_dir={session_cache}", *CHEAP, "method=none", "seed=0,1",
             f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    assert mansu_cli(sweep, tmp_path, timeout=600).returncode == 0
    done, crashed = sorted((tmp_path / "sweep").glob("*_none_seed*"))
    kept = (done / "result.json").read_bytes()
    # job 1 as a killed process leaves it: a failed record (or none) and its claim
    (crashed / "result.json").write_text(json.dumps({"status": "failed", "error": "Killed"}))
    (crashed / ".mansu-run").write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    out = mansu_cli(sweep, tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 of 2 jobs ok" in out.stderr
    assert re.search(r"none seed 0: forget .* \(finished before: not run again\)", out.stdout)
    assert "none seed 1: forget" in out.stdout and out.stdout.count("finished before") == 1
    assert (done / "result.json").read_bytes() == kept
    assert json.loads((crashed / "result.json").read_text())["status"] == "ok"
    assert json.loads((crashed / "result.attempt-1.json").read_text())["error"] == "Killed"


def test_not_enough_free_disk_is_found_before_any_work(tmp_path):
    with pytest.raises(SetupError, match=rf"not enough free disk for {tmp_path}"):
        check_free_disk({tmp_path: 1 << 60})
    check_free_disk({tmp_path: 1 << 10})


FILL_DISK_AT_THE_END = """
import os, sys
from mansu import cli
from mansu import run as launcher

last_stage, disk = launcher.reversal_stages, sys.argv[1]

def last_stage_then_fill_the_disk(*args, **kwargs):
    last_stage(*args, **kwargs)
    fd = os.open(os.path.join(disk, "filler"), os.O_CREAT | os.O_WRONLY)
    for chunk in (1 << 16, 1 << 10, 1):
        try:
            while True:
                os.write(fd, b"\\0" * chunk)
        except OSError:
            pass
    os.close(fd)

launcher.reversal_stages = last_stage_then_fill_the_disk
sys.argv = [sys.argv[0], *sys.argv[2:]]
cli.main()
"""


@needs_mount
def test_a_full_disk_at_the_end_still_leaves_a_record_and_no_flood(tmp_path, session_cache, tiny):
    script = tmp_path / "fill.py"
    script.write_text(textwrap.dedent(FILL_DISK_AT_THE_END))
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    args = " ".join([*TINY, f"cache_dir={session_cache}", *SMALL, f"output_root={disk}"])
    shell = (f"mount -t tmpfs -o size=80m tmpfs {disk} && cd {ROOT} && "
             f"{sys.executable} {script} {disk} {args}; rc=$?; cp -r {disk}/runs {copy}; exit $rc")
    out = subprocess.run(["unshare", "-m", "sh", "-c", shell], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0
    ours = [line for line in out.stderr.splitlines() if line.startswith("mansu:")]
    assert len(ours) <= 2, out.stderr[-3000:]  # the error line, and at most the log file's failure once
    assert len((out.stdout + out.stderr).splitlines()) < 100  # no flood
    assert "Logging error" not in out.stdout + out.stderr and "Traceback" not in out.stderr
    record = json.loads(next(copy.glob("*/result.json")).read_text())
    assert record["status"] == "failed" and "No space left" in record["error"]
    assert record["metrics"]["accuracy"]["q_thetau"]["forget"]["n"] > 0  # what it measured is kept


# --- one clear line for every bad input ---------------------------------------------------------


def jsonl(tmp_path: Path, name: str, content: bytes | None) -> Path:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    return path


GOOD = (json.dumps(GOOD_ROW) + "\n").encode()
BAD_FILES = {
    "broken line": (GOOD + b'{"question": "Q", \n', r"bad\.jsonl:2: not valid JSON"),
    "missing field": (b'{"question": "Q", "answer": 0}\n', r"bad\.jsonl:1: missing field\(s\) \['choices'\]"),
    "answer out of range": (b'{"question": "Q", "choices": ["a", "b"], "answer": 2}\n',
                            r"bad\.jsonl:1: answer 2 is out of range"),
    "empty file": (b"", r"bad\.jsonl: no questions in file"),
    "missing file": (None, r"benchmark file not found: .*bad\.jsonl"),
    "not UTF-8": (GOOD + b'{"question": "Caf\xe9", "choices": ["a", "b"], "answer": 0}\n',
                  r"bad\.jsonl:2: not UTF-8 text \(byte 0xe9"),
    "choices as one string": (b'{"question": "Q", "choices": "ABCD", "answer": 0}\n',
                              r"bad\.jsonl:1: choices must be a JSON list of strings, got str"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_benchmark_file_is_one_line_naming_file_and_line(tmp_path, session_cache, case):
    content, message = BAD_FILES[case]
    bad = jsonl(tmp_path, "bad.jsonl", content)
    good = jsonl(tmp_path, "good.jsonl", GOOD * 4)
    cfg = compose_config(["benchmark=local_jsonl", f"benchmark.forget_path={bad}",
                          f"benchmark.retain_path={good}"], cache_dir=session_cache)
    with pytest.raises(SystemExit) as exit_info:  # Hydra's InstantiationException is unwrapped
        cli.run_guarded(cfg, tmp_path / "run")
    line = str(exit_info.value)
    assert "\n" not in line and line.startswith("mansu: error: ")
    assert "InstantiationException" not in line
    assert re.search(message, line), line
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("args,message", [
    (["seed=abc"], "seed: expected int, got 'abc'"),
    (["storage=fp8"], "storage: expected 'fp32' | 'bf16' | 'bf16_master', got 'fp8'"),
    (["model=llama3_1_8b_instruct", "model.name_or_path={empty}"], "model folder {empty} has no config.json"),
])
def test_bad_config_values_fail_before_any_work(tmp_path, session_cache, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty") for a in args]
    cfg = compose_config(args, cache_dir=session_cache)
    with pytest.raises(SystemExit) as exit_info:
        cli.run_guarded(cfg, tmp_path / "run")
    assert message.format(empty=tmp_path / "empty") in str(exit_info.value)
    assert "\n" not in str(exit_info.value)
    timings = json.loads((tmp_path / "run" / "result.json").read_text()).get("timings", {})
    assert "evaluate_theta0" not in timings and "unlearn" not in timings


def test_cli_bad_jsonl_is_one_line_on_the_terminal(tmp_path):
    bad = jsonl(tmp_path, "bad.jsonl", GOOD + b"{oops\n")
    out = mansu_cli(["benchmark=local_jsonl", f"benchmark.forget_path={bad}",
                     f"benchmark.retain_path={bad}"], tmp_path / "outputs", timeout=300)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and f"{bad}:2: not valid JSON" in errors[0], out.stderr
    assert "Traceback" not in out.stderr


@needs_mount
@pytest.mark.parametrize("where", ["output_root", "cache_dir"])
def test_a_read_only_folder_is_found_before_any_work(tmp_path, where):
    ro = tmp_path / "ro"
    ro.mkdir()
    target = {"output_root": f"output_root={ro}", "cache_dir": f"cache_dir={ro}/cache"}[where]
    shell = (f"mount -t tmpfs -o size=1m,ro tmpfs {ro} && cd {ROOT} && "
             f"{sys.executable} -m mansu {target}")
    out = subprocess.run(["unshare", "-m", "sh", "-c", shell], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                           "MANSU_OUTPUTS": str(tmp_path / "outputs")})
    assert out.returncode != 0
    assert "is not writable (Read-only file system)" in out.stderr
    assert "Traceback" not in out.stderr and "stage load" not in out.stderr + out.stdout


def test_a_sweep_with_failed_jobs_exits_non_zero_with_a_summary(tmp_path, session_cache, tiny):
    out = mansu_cli(["-m", *TINY, f"cache_dir={session_cache}", *CHEAP, "method=none",
                     "seed=abc,def,ghi,0"], tmp_path, timeout=600)
    assert out.returncode != 0
    assert "1 of 4 jobs ok" in out.stderr
    summary = out.stderr[out.stderr.index("1 of 4 jobs ok"):].splitlines()[1:]
    assert len(summary) == 3 and all("failed: ConfigError: seed: expected int" in s for s in summary)


def test_make_tables_lists_job_folders_without_a_record(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_tables

    for job in ("0_ga_seed0", "1_ga_seed1", "2_ga_seed2"):
        (tmp_path / job / ".hydra").mkdir(parents=True)
    (tmp_path / "1_ga_seed1" / "result.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    (tmp_path / "2_ga_seed2" / "result.json").write_text('{"status": "ok", "metr')
    assert make_tables.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "0_ga_seed0: no record" in err and "1_ga_seed1: failed: boom" in err
    assert "2_ga_seed2: unreadable record" in err and "3 of 3 jobs have no finished record" in err


def test_quantization_refuses_a_non_finite_weight_by_name():
    from torch import nn

    from mansu.quantize.quantizer import quantize_model

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with torch.no_grad():
        model[2].weight[3, 5] = float("inf")
    with pytest.raises(ValueError, match=r"^2\.weight holds 1 NaN/inf value\(s\)"):
        quantize_model(model, skip_modules=())


# --- property: any malformed JSONL row gives one line naming file and line ------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5),
                                                                                       inner, max_size=3),
                           max_leaves=8)
rows = st.fixed_dictionaries({}, optional={"question": json_values, "choices": json_values,
                                           "answer": json_values, "extra": json_values})
lines = st.one_of(rows.map(lambda r: json.dumps(r).encode()),
                  json_values.map(lambda v: json.dumps(v).encode()),
                  st.binary(max_size=30).filter(lambda b: b"\n" not in b))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lines, max_size=4), st.integers(0, 4))
def test_any_malformed_row_is_one_line_naming_file_and_line(bad_lines, position):
    body = [json.dumps(GOOD_ROW).encode()] * 3
    body[min(position, 3):min(position, 3)] = bad_lines
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.jsonl"
        path.write_bytes(b"\n".join(body) + b"\n")
        try:
            questions = read_mcq_jsonl(path)
        except BenchmarkFileError as err:
            message = cli.one_line(err)
            assert message == str(err) and "\n" not in message
            assert message.startswith(f"{path}:")
            lineno = message[len(str(path)) + 1:].split(":")[0]
            assert lineno.isdigit() and 1 <= int(lineno) <= len(body)
        else:
            assert all(isinstance(q.choices, tuple) and len(q.choices) >= 2 for q in questions)


def test_encode_refuses_what_it_cannot_store():
    with pytest.raises(TypeError, match="cannot store a object"):
        encode({"x": object()}, {})
    assert decode(encode({("a", 1): (1, 2.5)}, {}), {}) == {("a", 1): (1, 2.5)}
