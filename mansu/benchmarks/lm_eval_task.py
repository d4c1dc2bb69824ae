"""WMDP and MMLU as lm-eval defines them: prompts and dataset ids come from lm-eval's own task
configs (lm_eval/tasks/wmdp, lm_eval/tasks/mmlu), not from copies here.

lm-eval's zero-shot context is the task's ``description`` followed by its ``doc_to_text``; for
WMDP and MMLU that is "The following are multiple choice questions (with answers) about
<subject>.\\n\\n" + the stripped question + "\\nA. ..\\nD. ..\\nAnswer:". mansu.evaluate.mcq's letter
prompt has no description and does not strip, so `lm_eval_question` moves the description and the
stripping into the question text. Each framed question is checked against lm-eval's rendered
prompt, so mansu's accuracy on it is lm-eval's (tests/benchmarks/test_real_benchmarks.py runs lm-eval's own
task on the same file to show it).

Offline, WMDP's questions come from a local JSONL in the WMDP schema (`local_path`); corpora
are a local JSONL (one {"text"} per line) or a hub dataset ``id[:config[:split]]``.
"""

from __future__ import annotations

import ast
import copy
import difflib
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import yaml

from mansu.benchmarks.local_jsonl import read_corpus_jsonl
from mansu.benchmarks.mmlu import load_mmlu
from mansu.data import (
    MCQ,
    Benchmark,
    BenchmarkFileError,
    Split,
    read_mcq_jsonl,
    statement_split,
    write_mcq_jsonl,
)
from mansu.evaluate.mcq import mcq_requests

# lm-eval's task for an MMLU subject, by scoring: `mmlu` is lettered, `mmlu_continuation` cloze.
MMLU_TASKS = {"letter": "mmlu_{subject}", "cloze": "mmlu_{subject}_continuation"}
WMDP_TASKS = ("wmdp_bio", "wmdp_cyber", "wmdp_chem")


@cache
def _task_index(family: str) -> dict:
    """lm-eval's index of one task folder (lm_eval/tasks/<family>): a fraction of a second,
    where indexing every installed task takes several."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    folder = Path(lm_eval.tasks.__file__).parent / family
    if not folder.is_dir():
        return {}
    return TaskManager(include_path=str(folder), include_defaults=False).task_index


def task_config(task: str) -> dict:
    """The installed lm-eval task's config, includes merged; nothing is downloaded."""
    index = _task_index(task.split("_")[0])
    entry = index.get(task)
    if entry is None or not entry.cfg:
        close = difflib.get_close_matches(task, list(index), n=3)
        raise ValueError(f"lm-eval has no task {task!r}"
                         + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return copy.deepcopy(entry.cfg)


@cache
def _template(source: str):
    from lm_eval.utils import env  # lm-eval's own Jinja environment (keeps trailing newlines)

    return env.from_string(source)


def _render(field, doc: dict):
    # lm-eval's resolve_field: a document key names its value, anything else is a template.
    if isinstance(field, str):
        return doc[field] if field in doc else _template(field).render(**doc)
    return field


def lm_eval_prompt(question: MCQ, config: dict) -> tuple[str, list[str]]:
    """lm-eval's zero-shot context and per-choice continuations for one question of a task."""
    doc = question.to_json()
    context = (_render(config.get("description") or "", doc)
               + _render(config["doc_to_text"], doc))
    choices = _render(config["doc_to_choice"], doc)
    if isinstance(choices, str):
        choices = ast.literal_eval(choices)
    delimiter = config.get("target_delimiter", " ")
    return context, [delimiter + str(choice) for choice in choices]


def lm_eval_question(question: MCQ, task: str, scoring: str) -> MCQ:
    """The question reworded so that mansu.evaluate.mcq's `scoring` prompt is lm-eval's for `task`.

    letter: description + stripped question (mansu adds the lettered options and "Answer:");
    cloze: the whole lm-eval context (mansu continues it with " " + choice).
    """
    config = task_config(task)
    context, continuations = lm_eval_prompt(question, config)
    if scoring == "letter":
        text = _render(config.get("description") or "", question.to_json())
        text += question.question.strip()
    elif scoring == "cloze":
        text = context
    else:
        raise ValueError(f"unknown scoring {scoring!r}; expected letter or cloze")
    framed = MCQ(text, question.choices, question.answer)
    if mcq_requests(framed, scoring) != (context, continuations):
        raise ValueError(f"lm-eval's {task} prompt cannot be written as mansu's {scoring} "
                         f"prompt: lm-eval scores {continuations} after {context!r}")
    return framed


def mmlu_questions(pairs: Sequence[tuple[str, MCQ]], scoring: str, *,
                   lm_eval_prompt: bool = True) -> list[MCQ]:
    """MMLU (subject, question) pairs as questions scored the way lm-eval's `mmlu` (letter) or
    `mmlu_continuation` (cloze) scores them; lm_eval_prompt=False keeps the bare questions."""
    if not lm_eval_prompt:
        return [question for _, question in pairs]
    return [lm_eval_question(question, MMLU_TASKS[scoring].format(subject=subject), scoring)
            for subject, question in pairs]


def write_task_yaml(task: str, questions: Sequence[MCQ], task_dir: str | Path) -> Path:
    """lm-eval's own `task`, its dataset replaced by a local JSONL of `questions` (bare, as in
    the hub dataset): run it with mansu.evaluate.lm_eval_tasks.lm_eval_accuracy(model, tok, task_dir, task)
    to cross-check mansu's numbers. Returns the YAML path."""
    task_dir = Path(task_dir).resolve()
    data_path = write_mcq_jsonl(list(questions), task_dir / f"{task}.jsonl")
    config = task_config(task)
    for key in ("dataset_name", "fewshot_split", "fewshot_config", "tag", "group"):
        config.pop(key, None)  # a local file has one split and no hub config
    config.update(dataset_path="json", dataset_kwargs={"data_files": {"test": str(data_path)}},
                  test_split="test")
    path = task_dir / f"{task}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def read_corpus(spec: str, *, min_chars: int = 0, max_docs: int | None = None) -> list[str]:
    """Texts of a local JSONL (one {"text"} per line) or of a hub dataset `id[:config[:split]]`
    (split defaults to train), keeping those longer than min_chars, at most max_docs of them."""
    if _is_local(spec):
        texts = read_corpus_jsonl(Path(spec).expanduser())
    else:
        texts = _hub_texts(spec)
    texts = [t for t in texts if len(t) > min_chars][:max_docs]
    if not texts:
        raise BenchmarkFileError(f"corpus {spec}: no text longer than {min_chars} characters")
    return texts


def _is_local(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or spec.endswith((".jsonl", ".json"))


def _hub_texts(spec: str) -> list[str]:
    import datasets

    dataset_id, config, split = (spec.split(":") + [None, None])[:3]
    try:
        rows = datasets.load_dataset(dataset_id, config or None, split=split or "train")
    except Exception as err:  # datasets raises many types for "not reachable / not cached"
        raise BenchmarkFileError(
            f"corpus {spec!r} could not be loaded from the Hugging Face hub ({err}); give a local "
            f"JSONL file with one {{\"text\": ...}} per line instead") from None
    return [str(text) for text in rows["text"]]


def _wmdp_questions(task: str, local_path: str | None) -> list[MCQ]:
    if local_path:
        return read_mcq_jsonl(Path(local_path).expanduser())
    import datasets

    config = task_config(task)
    source = f"{config['dataset_path']} ({config.get('dataset_name')}, {config['test_split']})"
    try:
        rows = datasets.load_dataset(config["dataset_path"], config.get("dataset_name"),
                                     split=config["test_split"])
    except Exception as err:  # datasets raises many types for "not reachable / not cached"
        raise BenchmarkFileError(
            f"{task}'s questions come from the hub dataset {source}, which could not be loaded "
            f"({err}); give a local copy in the WMDP schema: benchmark.local_path=/path/{task}"
            f".jsonl") from None
    return [MCQ.from_json(row) for row in rows]


def build_wmdp(
    *,
    task: str = "wmdp_bio",
    local_path: str | None = None,
    forget_corpus: str,
    retain_corpus: str = "Salesforce/wikitext:wikitext-2-raw-v1:test",
    min_corpus_chars: int = 50,
    max_corpus_docs: int | None = None,
    mmlu_subjects: list[str] | None = None,
    mmlu_size: int | None = None,
    mmlu_seed: int = 0,
    lm_eval_prompt: bool = True,
) -> Benchmark:
    """Forget = the WMDP task's questions and a forget corpus; retain = MMLU (lm-eval's `mmlu`,
    all 14,042 questions unless subjects/size narrow it) and a retain corpus. Letter scoring."""
    if task not in WMDP_TASKS:
        raise ValueError(f"benchmark.task must be one of {WMDP_TASKS}, got {task!r}")
    questions = _wmdp_questions(task, local_path)
    if lm_eval_prompt:
        questions = [lm_eval_question(q, task, "letter") for q in questions]
    retain_questions = mmlu_questions(
        load_mmlu(subjects=mmlu_subjects, size=mmlu_size, seed=mmlu_seed), "letter",
        lm_eval_prompt=lm_eval_prompt)
    corpus = dict(min_chars=min_corpus_chars, max_docs=max_corpus_docs)
    return Benchmark(task, Split(questions, read_corpus(forget_corpus, **corpus)),
                     Split(retain_questions, read_corpus(retain_corpus, **corpus)),
                     scoring="letter")


def build_mmlu(
    *,
    forget_subjects: list[str],
    retain_subjects: list[str] | None = None,
    retain_size: int | None = 1000,
    seed: int = 0,
    scoring: str = "letter",
    lm_eval_prompt: bool = True,
) -> Benchmark:
    """Forget = every MMLU question of some subjects, retain = a seeded sample of the others (or
    of retain_subjects); each trains on its questions completed by their answers."""
    forget = load_mmlu(subjects=forget_subjects)
    retain = load_mmlu(subjects=retain_subjects, exclude=forget_subjects, size=retain_size,
                       seed=seed)

    def split(pairs):
        statements = statement_split([question for _, question in pairs])
        return Split(mmlu_questions(pairs, scoring, lm_eval_prompt=lm_eval_prompt),
                     statements.corpus, statements.answer_starts)

    return Benchmark("mmlu", split(forget), split(retain), scoring=scoring)
