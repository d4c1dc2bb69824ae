"""`mansu`: one run = load → [inject] → evaluate θ0 and Q(θ0) → attribute θ0 → unlearn → evaluate
θu and Q(θu) → reversal analyses → CAD → record. `run` is the recipe: one call per stage, in that
order; each stage's code lives in its folder (mansu/<stage>/stage.py), and the leaves (model,
benchmark, method, quantizer, logger) are built from their configs' `_target_`.

Q(θ0) is built and evaluated before unlearning, so θ0 never needs a second copy on the device, and
stage results are cached by config (mansu.io.cache), so a sweep evaluates θ0 once and a rerun resumes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mansu.attribution.stage import attribute_theta0
from mansu.benchmarks.parts import fingerprints, with_retain_parts
from mansu.cad.stage import circuit_divergence
from mansu.config import ConfigError, validate, validate_top_level
from mansu.context import RunContext
from mansu.data import Benchmark
from mansu.evaluate.stage import GENERAL_TEXT, evaluate
from mansu.io.cache import StageCache, key_of
from mansu.io.record import atomic_write_json, environment, summary_table
from mansu.io.safeguards import check_free_disk, check_writable
from mansu.quantize.stage import quantize
from mansu.reversal.stage import reversal_stages
from mansu.settings import AttributionSettings, EvalSettings
from mansu.stats import paired_bootstrap
from mansu.unlearn.sharding import init_distributed, memory_key
from mansu.unlearn.stage import unlearn
from mansu.verdicts import judge

log = logging.getLogger("mansu")
stage_log = logging.getLogger("mansu.stage")  # one line per stage (run.log only in a sweep)
table_log = logging.getLogger("mansu.table")  # the run's table (run.log only in a sweep)


def run(cfg: DictConfig, run_dir: Path, record: dict) -> dict:
    job = start(cfg, run_dir, record)
    with job.stage("load"):
        load_stage(job)
    with job.stage("evaluate_theta0"):
        job.accuracy["theta0"] = job.evaluated("theta0", job.model_key)
    if job.quantized:
        with job.stage("quantize_theta0"):
            job.accuracy["q_theta0"] = job.evaluated(
                "q_theta0", job.model_key, cfg.quantizer, model=lambda: quantize(job.model, cfg)[0])
    if job.attribution.enabled:
        with job.stage("attribution_theta0"):
            attribution_stage(job)
    with job.stage("unlearn"):
        unlearn_stage(job)
    with job.stage("evaluate_thetau"):
        job.accuracy["thetau"] = job.evaluated("thetau", job.unlearn_key)
    if job.quantized:
        with job.stage("quantize_thetau"):
            quantize_thetau_stage(job)
        reversal_stages(job.metrics, job.stage, job.model, job.quantized_state, job.theta0,
                        job.tokenizer, job.benchmark, job.ctx.scoring, job.settings, job.ctx, cfg)
    if job.attribution.enabled and job.settings.cad:
        with job.stage("cad"):
            job.metrics["cad"] = circuit_divergence(
                job.model, job.qmodel, job.tokenizer, job.theta0_attr, job.attribution,
                job.ctx.scoring, run_dir, scores=job.settings.cad_scores)
    return finish(job)


@dataclass
class Job:
    """What the stages of one run share; each stage fills in what later ones read."""

    cfg: DictConfig
    run_dir: Path
    record: dict
    settings: EvalSettings
    attribution: AttributionSettings
    ctx: RunContext
    cache: StageCache
    tracker: object
    stage: object
    benchmark: Benchmark | None = None
    model: torch.nn.Module | None = None
    tokenizer: object = None
    model_key: str = ""
    unlearn_key: str = ""
    theta0: dict = field(default_factory=dict)
    theta0_attr: dict | None = None
    qmodel: torch.nn.Module | None = None
    quantized_state: dict | None = None

    @property
    def metrics(self) -> dict:
        return self.record.setdefault("metrics", {})

    @property
    def accuracy(self) -> dict:
        return self.metrics.setdefault("accuracy", {})

    @property
    def quantized(self) -> bool:
        return self.cfg.quantizer.quant_type != "none"

    def evaluated(self, name: str, *key: object, model: Callable[[], torch.nn.Module] | None = None
                  ) -> dict:
        """Accuracy on every split of the job's model (θ0 or θu), or of the one `model` builds
        (only when the cache has no entry for `key`)."""
        return self.cache.json("eval", key_of(*key, name), lambda: evaluate(
            self.model if model is None else model(), self.tokenizer, self.benchmark,
            self.ctx.scoring, self.settings))


def start(cfg: DictConfig, run_dir: Path, record: dict) -> Job:
    """Every check that needs no model: the config against the code, the folders, the context."""
    validate_top_level(cfg)
    validate(cfg)
    check_circuit_source(cfg)
    init_distributed(cfg)
    settings: EvalSettings = instantiate(cfg.eval)
    ctx = make_context(cfg, run_dir)
    check_writable(run_dir, "output folder", "set output_root=... or MANSU_OUTPUTS to a writable folder")
    if settings.cache:
        check_writable(ctx.cache_dir, "cache folder",
                       "set cache_dir=... to a writable folder, or eval.cache=false")
    timings: dict[str, float] = {}
    job = Job(cfg=cfg, run_dir=run_dir, record=record, settings=settings,
              attribution=instantiate(cfg.attribution), ctx=ctx,
              cache=StageCache(ctx.cache_dir, enabled=settings.cache),
              tracker=instantiate(cfg.logger), stage=stopwatch(timings))
    record.update(describe(cfg, ctx), timings=timings, environment=environment())
    job.tracker.start(OmegaConf.to_container(cfg, resolve=True), run_dir, run_dir.name)
    return job


def check_circuit_source(cfg: DictConfig) -> None:
    """MANSU confines itself to the attribution stage's circuit: without that stage it can only
    unlearn every quantized weight (circuit=full). Said before anything is loaded."""
    circuit = cfg.method.get("circuit")
    if (str(cfg.method.get("_target_", "")).startswith("mansu.unlearn.mansu")
            and circuit in ("attributed", "random") and not cfg.attribution.get("enabled", True)):
        raise ConfigError(f"method.circuit={circuit} needs the attribution stage's circuit "
                          f"(attribution=eap_ig); set method.circuit=full to unlearn every "
                          f"quantized weight instead")


def load_stage(job: Job) -> None:
    """The benchmark and the model (built and taught its facts, or loaded), and the scoring."""
    job.benchmark, job.model, job.tokenizer = load(job.cfg, job.ctx)
    # θu's changed tensors: at most every parameter, once in the cache and once in the run folder.
    weights = sum(p.numel() * p.element_size() for p in job.model.parameters())
    check_free_disk({job.run_dir: weights,
                     **({job.ctx.cache_dir: weights} if job.settings.cache else {})})
    scoring = job.settings.scoring or job.benchmark.scoring
    job.ctx = replace(job.ctx, scoring=scoring, retain_fit=job.benchmark.retain_fit)
    job.record["scoring"] = scoring
    job.record["data"] = fingerprints(job.benchmark)
    job.record["theta0"] = getattr(job.model, "theta0_source", {"format": "built by the model config"})
    job.record.setdefault("metrics", {}).setdefault("accuracy", {})
    settings = job.settings
    job.model_key = key_of(job.cfg.model, job.cfg.benchmark, job.cfg.storage, scoring,
                           settings.bootstrap_iters, "retain parts", settings.retain_train,
                           settings.retain_fit, settings.retain_split_seed)


def attribution_stage(job: Job) -> None:
    """θ0's forget circuit (cached per θ0): the unlearning may confine itself to it, CAD reads it."""
    job.theta0_attr = job.cache.objects(
        "attribution", key_of(job.model_key, job.cfg.attribution, "per-item-frozen"),
        lambda: attribute_theta0(job.model, job.tokenizer, job.benchmark, job.attribution,
                                 job.ctx.scoring, seed=0))
    job.ctx = replace(job.ctx, circuit=job.theta0_attr["circuit"])
    job.metrics["circuit"] = job.theta0_attr["circuit"].to_json()


def unlearn_stage(job: Job) -> None:
    """θu: the method run on the model in place (or its cached changes reapplied); θ0 kept on CPU."""
    job.theta0 = {name: t.detach().to("cpu", copy=True) for name, t in job.model.state_dict().items()}
    job.unlearn_key = key_of(job.model_key, job.cfg.method, job.ctx.seed, *memory_key(job.cfg))
    job.metrics["unlearning"] = unlearn(job.model, job.tokenizer, job.benchmark, job.ctx, job.cfg,
                                        job.cache, job.unlearn_key, job.theta0)


def quantize_thetau_stage(job: Job) -> None:
    """Q(θu), its accuracy, and the PTQ gap: acc(Q(θu)) − acc(θu) on the forget questions."""
    job.qmodel, job.quantized_state = quantize(job.model, job.cfg)
    job.accuracy["q_thetau"] = job.evaluated("q_thetau", job.unlearn_key, job.cfg.quantizer,
                                             model=lambda: job.qmodel)
    job.metrics["ptq_gap"] = paired_bootstrap(
        job.accuracy["thetau"]["forget"]["correct"], job.accuracy["q_thetau"]["forget"]["correct"],
        iters=job.settings.bootstrap_iters, seed=job.ctx.seed)


def finish(job: Job) -> dict:
    """Per-question outcomes beside the record, the four verdicts, the record written atomically."""
    job.qmodel = None
    record = job.record
    general = {name: splits.pop(GENERAL_TEXT) for name, splits in job.accuracy.items()
               if GENERAL_TEXT in splits}
    # Per-question outcomes go beside the record (for paired comparisons across runs), not in it.
    correct = {model_name: {split: result.pop("correct") for split, result in splits.items()}
               for model_name, splits in job.accuracy.items()}
    atomic_write_json(job.run_dir / "predictions.json", {
        name: {**splits, **({GENERAL_TEXT: general[name]["per_text"]} if name in general else {})}
        for name, splits in correct.items()})
    if general:
        record["metrics"][GENERAL_TEXT] = general_text_report(general, job.settings, job.ctx.seed)
    chance = [1 / len(question.choices) for question in job.benchmark.forget.questions]
    record.update(judge(record["metrics"], correct, chance, job.settings, job.ctx.seed))
    record["status"] = "ok"
    path = atomic_write_json(job.run_dir / "result.json", record)
    job.tracker.log_record(record)
    job.tracker.finish(ok=True)
    table_log.info("\n%s", summary_table(record))
    log.info("%s", job_line(record, path))
    return record


def general_text_report(general: dict, settings: EvalSettings, seed: int) -> dict:
    """Each model's mean NLL per token on the general text, and the paired change of θu and of
    Q(θu) from θ0 with its interval (reported beside retain; no margin is set for it yet)."""
    report = {name: {"mean": g["mean"], "n": g["n"]} for name, g in general.items()}
    for name in ("thetau", "q_thetau"):
        if name in general and "theta0" in general:
            report[f"{name}_change"] = paired_bootstrap(
                general["theta0"]["per_text"], general[name]["per_text"],
                iters=settings.bootstrap_iters, seed=seed)
    return report


def job_line(record: dict, path: Path) -> str:
    """One terminal line per finished job: what it is, forget accuracy θ0 → θu → Q(θu), and where
    its record is (the table of a sweep comes from scripts/make_tables.py)."""
    acc = record["metrics"]["accuracy"]
    forget = " → ".join(f"{acc[k]['forget']['accuracy']:.3f}" for k in ("theta0", "thetau", "q_thetau")
                        if k in acc)
    seconds = sum(record.get("timings", {}).values())
    return (f"{record['choices'].get('method')} seed {record['seed']}: forget {forget} "
            f"(θ0 → θu → Q(θu)), {seconds:.0f} s; record {path}")


def make_context(cfg: DictConfig, run_dir: Path) -> RunContext:
    if cfg.cpu_threads is not None:
        if not isinstance(cfg.cpu_threads, int) or cfg.cpu_threads < 1:
            raise ConfigError(f"cpu_threads: expected a positive integer or null, got {cfg.cpu_threads!r}")
        torch.set_num_threads(cfg.cpu_threads)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return RunContext(seed=cfg.seed, storage=cfg.storage, device=device, run_dir=run_dir,
                      cache_dir=Path(cfg.cache_dir))


def describe(cfg: DictConfig, ctx: RunContext) -> dict:
    choices = {}
    if HydraConfig.initialized():
        runtime = HydraConfig.get().runtime.choices
        choices = {g: runtime.get(g) for g in ("model", "benchmark", "method", "quantizer")}
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return {"choices": choices, "overrides": overrides, "seed": ctx.seed, "storage": ctx.storage,
            "device": ctx.device, "quantizer": cfg.quantizer.quant_type,
            "config": OmegaConf.to_container(cfg, resolve=True)}


@contextmanager
def stopwatch_stage(timings: dict, name: str):
    stage_log.info("stage %s", name)
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - start, 3)


def stopwatch(timings: dict):
    return lambda name: stopwatch_stage(timings, name)


def load(cfg: DictConfig, ctx: RunContext) -> tuple[Benchmark, torch.nn.Module, object]:
    """The benchmark with its retain parts cut and checked (before the model: a bad split costs
    seconds), then the model, taught every fact when the benchmark asks for it."""
    benchmark: Benchmark = instantiate(cfg.benchmark)
    if not benchmark.forget.questions:
        raise ValueError("the forget set is empty")
    settings: EvalSettings = instantiate(cfg.eval)
    parted = with_retain_parts(benchmark, train=settings.retain_train, fit=settings.retain_fit,
                               seed=settings.retain_split_seed, min_eval=settings.min_retain_eval)
    model, tokenizer = instantiate(cfg.model, _partial_=True)(benchmark, ctx)
    model = model.to(device=ctx.device, dtype=ctx.param_dtype)
    model.eval()
    return parted, model, tokenizer

