"""Quiet by default: a run's terminal shows stages, warnings that concern the user and the table;
its run.log keeps every record, library notices included."""

from __future__ import annotations

import logging

from conftest import TINY, mansu_cli

from mansu.io.logs import ConsoleFilter


def _record(name: str, level: int, msg: str = "message", args=()) -> logging.LogRecord:
    return logging.LogRecord(name, level, "file.py", 1, msg, args, None)


def test_console_filter_keeps_stages_and_errors_and_drops_library_chatter():
    keep = ConsoleFilter().filter
    assert keep(_record("mansu.stage", logging.INFO, "stage load"))
    assert keep(_record("mansu", logging.INFO, "ga seed 0: forget ..."))
    assert keep(_record("mansu.models.loaders", logging.INFO, "converted ..."))
    assert not keep(_record("mansu.io.cache", logging.INFO, "eval: reusing ..."))
    assert keep(_record("mansu.io.cache", logging.WARNING, "unreadable cache entry"))
    assert not keep(_record("bitsandbytes.autograd._functions", logging.WARNING,
                            "MatMul8bitLt: inputs will be cast"))
    assert keep(_record("bitsandbytes.autograd._functions", logging.ERROR, "a real failure"))
    assert not keep(_record("py.warnings", logging.WARNING, "%s",
                            ("/x/site-packages/transformers/a.py:3: UserWarning: ...",)))
    assert keep(_record("py.warnings", logging.WARNING, "%s", ("/work/mansu/a.py:3: UserWarning",)))


def test_tiny_run_prints_a_short_terminal_and_keeps_the_detail_in_run_log(tmp_path, session_cache,
                                                                          tiny):
    # Attribution off: its progress bars (one per item set and circuit size) are mansu.attribution's.
    out = mansu_cli([*TINY, f"cache_dir={session_cache}", "method=ga", "method.max_steps=8",
                     "method.batch_size=8", "attribution=none",
                     f"hydra.run.dir={tmp_path / 'run'}"], tmp_path / "outputs")
    assert out.returncode == 0, out.stderr[-2000:]
    # Lines as a terminal shows them: a progress bar redraws its own line with \r.
    terminal = (out.stdout + out.stderr).rstrip("\n").split("\n")
    assert len(terminal) <= 30, "\n".join(terminal)
    assert not any("MatMul8bitLt" in line or "kernels" in line for line in terminal)
    assert any("stage other_formats" in line for line in terminal)
    assert any("quantization_permanence" in line for line in terminal)

    run_log = (tmp_path / "run" / "run.log").read_text()
    assert "MatMul8bitLt: inputs will be cast" in run_log  # the int8 gap's per-layer notices
    assert "[mansu.stage][INFO] - stage other_formats" in run_log


def test_a_sweep_prints_one_line_per_job_and_its_stages_go_to_run_log(tmp_path, session_cache, tiny):
    """In a multirun the terminal gets Hydra's job lines and one summary line per job; the stage
    lines and each job's own table stay in the job's run.log."""
    sweep = tmp_path / "sweep"
    out = mansu_cli(["-m", *TINY, f"cache_dir={session_cache}", "method=ga", "seed=0,1",
                     "method.max_steps=4", "attribution=none", "eval.other_formats=[]",
                     f"hydra.sweep.dir={sweep}"], tmp_path / "outputs")
    assert out.returncode == 0, out.stderr[-2000:]
    terminal = (out.stdout + out.stderr).rstrip("\n").split("\n")
    assert not any("stage " in line for line in terminal), "\n".join(terminal)
    jobs = [line for line in terminal if "(θ0 → θu → Q(θu))" in line]
    assert len(jobs) == 2 and all("result.json" in line for line in jobs)
    assert len(terminal) <= 10, "\n".join(terminal)
    for job in ("0_ga_seed0", "1_ga_seed1"):
        run_log = (sweep / job / "run.log").read_text()
        assert "[mansu.stage][INFO] - stage evaluate_thetau" in run_log
        assert "quantization_permanence" in run_log
