"""docs/adding_a_method.md, followed step by step: the files it marks ``<!-- file: PATH -->`` are
written into a temporary copy (code on an extended package path, the YAMLs into a copy of conf/;
the repository's own conf/, baselines/ and mansu/ are left as they are), then the method is
composed with the tiny overrides, validated, instantiated and run, and the doc's own test is run."""

from __future__ import annotations

import copy
import importlib
import inspect
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mansu.config import ConfigError, validate
from mansu.context import RunContext
from mansu.data import Benchmark
from mansu.unlearn.checks import UnlearnResult

DOC = ROOT / "docs" / "adding_a_method.md"
BLOCK = re.compile(r"<!-- file: (\S+) -->\n```\w*\n(.*?)\n```", re.S)


def doc_files() -> dict[str, str]:
    """PATH -> text of every block the doc marks ``<!-- file: PATH -->``, in the doc's order."""
    files = dict(BLOCK.findall(DOC.read_text()))
    assert files, f"{DOC} marks no file block"
    return files


FILES = doc_files()
METHOD = next(Path(p).stem for p in FILES if p.startswith("baselines/"))
BENCHMARK = next(Path(p).stem for p in FILES if p.startswith("conf/benchmark/"))
MODEL = next(Path(p).stem for p in FILES if p.startswith("conf/model/"))


def compose_from(conf: Path, overrides: list[str]):
    """conftest.compose_config on another config folder: the tiny sizes, minus those of a group
    the overrides swap, then the overrides."""
    swapped = {o.split("=")[0] for o in overrides if "=" in o and "." not in o.split("=")[0]}
    sizes = [o for o in TINY if o.split(".")[0] not in swapped]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("config", overrides=[*sizes, *overrides])


@pytest.fixture
def example(tmp_path, monkeypatch):
    """The doc's files in tmp_path: `conf` (a copy of conf/ with the doc's YAMLs added) and its
    modules importable under their package names; afterwards nothing of them stays imported."""
    for path in FILES:
        assert not (ROOT / path).exists(), (f"{path} is in the repository: the worked example "
                                            "must use a name of its own")
    conf, code = tmp_path / "conf", tmp_path / "code"
    shutil.copytree(ROOT / "conf", conf)
    modules = []
    for path, text in FILES.items():
        target = conf / path.removeprefix("conf/") if path.startswith("conf/") else code / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n")
        if path.endswith(".py") and not path.startswith("tests/"):
            package = importlib.import_module(str(Path(path).parent).replace("/", "."))
            monkeypatch.setattr(package, "__path__", [*package.__path__, str(target.parent)])
            modules.append(path.removesuffix(".py").replace("/", "."))
    importlib.invalidate_caches()
    yield conf, code
    for name in modules:
        sys.modules.pop(name, None)
        parent, _, leaf = name.rpartition(".")
        if hasattr(sys.modules[parent], leaf):
            delattr(sys.modules[parent], leaf)
    for path in FILES:
        assert not (ROOT / path).exists(), f"the test wrote {path} into the repository"


def test_the_doc_gives_a_module_a_config_and_a_test_in_that_order():
    text = DOC.read_text()
    steps = [text.index(f"### {n}.") for n in (1, 2, 3)]
    marks = [text.index(f"<!-- file: {p} -->") for p in
             (f"baselines/{METHOD}.py", f"conf/method/{METHOD}.yaml",
              f"tests/baselines/test_{METHOD}.py")]
    assert steps[0] < marks[0] < steps[1] < marks[1] < steps[2] < marks[2]
    assert "make test" in text and f"mansu method={METHOD}" in text
    assert "tests/test_config.py" in text


@pytest.mark.parametrize("path", [p for p in FILES if p.startswith("conf/")])
def test_every_doc_yaml_opens_with_what_it_is_and_how_to_run_it(path):
    lines = FILES[path].splitlines()
    opening = lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))]
    assert opening and any("mansu" in line for line in opening), path


def test_the_method_composes_validates_and_unlearns(example, tiny, session_cache):
    conf, _ = example
    base = [f"cache_dir={session_cache}", f"method={METHOD}"]
    cfg = compose_from(conf, base)
    validate(cfg)
    tuning = OmegaConf.create(FILES[f"conf/tuning/tiny_{METHOD}.yaml"]).method
    assert cfg.method.lr == tuning.lr  # model=tiny picks up the tuning file on its own

    cfg = compose_from(conf, [*base, "method.lr=1e-2", "method.max_steps=2"])
    validate(cfg)
    unlearn = instantiate(cfg.method)
    benchmark, model, tokenizer = tiny
    model = copy.deepcopy(model)  # the session's tiny model is shared
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = unlearn(model, tokenizer, benchmark.forget, benchmark.retain,
                     RunContext(seed=cfg.seed, storage=cfg.storage, cache_dir=session_cache))
    assert isinstance(result, UnlearnResult) and result.model is model
    assert result.steps == 2 and len(result.losses) == 2
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert result.info["loss_tokens"] == "answer"

    with pytest.raises(ConfigError, match=r"method\.alpah: unknown key .*did you mean 'alpha'"):
        validate(compose_from(conf, [*base, "+method.alpah=0.5"]))
    with pytest.raises(ConfigError, match=r"method\.alpha: expected float, got 'much'"):
        validate(compose_from(conf, [*base, "method.alpha=much"]))


def test_the_docs_test_passes(example):
    path = f"tests/baselines/test_{METHOD}.py"
    namespace = {"__name__": f"doc_test_{METHOD}"}
    exec(compile(FILES[path], path, "exec"), namespace)
    tests = {name: fn for name, fn in namespace.items() if name.startswith("test_")}
    assert tests
    for name, fn in tests.items():
        assert not inspect.signature(fn).parameters, f"{name}: the doc's test takes a fixture"
        fn()


def test_the_benchmark_and_model_examples_compose_and_validate(example):
    conf, _ = example
    cfg = compose_from(conf, [f"benchmark={BENCHMARK}"])
    validate(cfg)
    benchmark = instantiate(cfg.benchmark)
    assert isinstance(benchmark, Benchmark) and benchmark.forget.corpus
    validate(compose_from(conf, [f"model={MODEL}"]))  # a hub model: composed, not downloaded
