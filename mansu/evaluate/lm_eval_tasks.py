"""lm-eval as the standard path: questions as a local lm-eval task, evaluated offline in memory.

The task YAML states the same prompts as ``mansu.evaluate.mcq.mcq_requests``: cloze scores
" " + choice after the question, letter scores " A".." D" after the lettered options and
"Answer:" (lm-eval's default ``target_delimiter`` is the space). lm-eval is imported only inside
the functions that run it: importing it takes seconds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import yaml
from packaging.version import Version

from mansu.data import LETTERS, MCQ, write_mcq_jsonl

LM_EVAL_VERSION = "0.4.13"

# Each scoring's prompt as lm-eval task fields. Cloze names the fields themselves, not a template:
# lm-eval turns a rendered template that is all digits (a question "1984") into an int.
_TASK_FIELDS = {
    "cloze": {"doc_to_text": "question", "doc_to_choice": "choices"},
    "letter": {
        "doc_to_text": "{{question}}{% for choice in choices %}\n"
        "{{ '" + "".join(LETTERS) + "'[loop.index0] }}. {{choice}}{% endfor %}\nAnswer:",
        "doc_to_choice": "{{ " + repr(list(LETTERS)) + "[:choices|length] }}",
    },
}


def lm_eval_version_check() -> None:
    """Raise unless lm-eval is the release whose scoring mansu.evaluate.mcq reproduces."""
    installed = version("lm_eval")
    if Version(installed).release[:3] != Version(LM_EVAL_VERSION).release:
        raise RuntimeError(
            f"lm-eval {installed} is installed, but mansu reproduces the scoring of lm-eval "
            f"{LM_EVAL_VERSION}: run `pip install lm-eval=={LM_EVAL_VERSION}`"
        )


def write_local_task(
    questions: Sequence[MCQ], task_dir: str | Path, task_name: str, scoring: str
) -> Path:
    """Write ``<task_name>.jsonl`` and ``<task_name>.yaml`` into task_dir; return the YAML path."""
    if scoring not in _TASK_FIELDS:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {sorted(_TASK_FIELDS)}")
    if scoring == "letter" and any(len(q.choices) > len(LETTERS) for q in questions):
        raise ValueError(f"letter scoring supports at most {len(LETTERS)} choices")
    task_dir = Path(task_dir).resolve()
    data_path = write_mcq_jsonl(list(questions), task_dir / f"{task_name}.jsonl")
    config = {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_path)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        **_TASK_FIELDS[scoring],
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    yaml_path = task_dir / f"{task_name}.yaml"
    yaml_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return yaml_path


def lm_eval_accuracy(
    model,
    tokenizer,
    task_dir: str | Path,
    task_name: str,
    *,
    batch_size: int = 32,
    bootstrap_iters: int = 0,
) -> dict:
    """Run lm-eval's simple_evaluate on an in-memory model, offline, zero-shot.

    Returns accuracy (and its stderr when bootstrap_iters > 0), n, and per question in file
    order the prediction and the log-likelihood of every choice. Log-softmax runs in float32
    (HFLM's ``softmax_dtype``) so that a bf16 model's scores are not rounded to bf16 first.
    HFLM puts the model in eval mode; its train mode is restored afterwards.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    lm_eval_version_check()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  softmax_dtype=torch.float32)
        output = simple_evaluate(
            model=lm,
            tasks=[task_name],
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
            num_fewshot=0,
            bootstrap_iters=bootstrap_iters,
            log_samples=True,
        )
    finally:
        model.train(was_training)

    metrics = output["results"][task_name]
    samples = sorted(output["samples"][task_name], key=lambda sample: sample["doc_id"])
    loglikelihoods = [[float(ll) for ll, _ in sample["filtered_resps"]] for sample in samples]
    result = {
        "accuracy": float(metrics["acc,none"]),
        "n": len(samples),
        "predictions": [int(np.argmax(lls)) for lls in loglikelihoods],
        "loglikelihoods": loglikelihoods,
    }
    if bootstrap_iters > 0:
        result["acc_stderr"] = float(metrics["acc_stderr,none"])
    return result
