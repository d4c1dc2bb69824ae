"""`mansu`: one run = load → [inject] → evaluate θ0 → unlearn → evaluate θu → quantize θ0 and θu →
evaluate both → diagnostics → record. Each stage is a plain function called in order by `run`; the
leaves (model, benchmark, method, quantizer, logger) are built from their configs' `_target_`.

Q(θ0) is built and evaluated before unlearning, so θ0 never needs a second copy on the device, and
stage results are cached by config (mansu.io.cache), so a sweep evaluates θ0 once and a rerun resumes.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mansu.config import ConfigError, validate, validate_top_level
from mansu.context import RunContext
from mansu.data import Benchmark
from mansu.io.cache import StageCache, key_of
from mansu.io.record import (
    atomic_save_tensors,
    atomic_write_json,
    environment,
    summary_table,
    verdicts,
)
from mansu.io.safeguards import (
    check_free_disk,
    check_writable,
)
from mansu.settings import AttributionSettings, EvalSettings
from mansu.stats import paired_bootstrap
from mansu.unlearn.sharding import init_distributed, memory_key, unlearn_with_memory_options

log = logging.getLogger("mansu")
stage_log = logging.getLogger("mansu.stage")  # one line per stage (run.log only in a sweep)
table_log = logging.getLogger("mansu.table")  # the run's table (run.log only in a sweep)


def run(cfg: DictConfig, run_dir: Path, record: dict) -> dict:
    validate_top_level(cfg)
    validate(cfg)
    init_distributed(cfg)
    settings: EvalSettings = instantiate(cfg.eval)
    ctx = make_context(cfg, run_dir)
    check_writable(run_dir, "output folder", "set output_root=... or MANSU_OUTPUTS to a writable folder")
    if settings.cache:
        check_writable(ctx.cache_dir, "cache folder",
                       "set cache_dir=... to a writable folder, or eval.cache=false")
    cache = StageCache(ctx.cache_dir, enabled=settings.cache)
    tracker = instantiate(cfg.logger)
    timings: dict[str, float] = {}
    stage = stopwatch(timings)
    record.update(describe(cfg, ctx), timings=timings, environment=environment())
    tracker.start(OmegaConf.to_container(cfg, resolve=True), run_dir, run_dir.name)

    with stage("load"):
        benchmark, model, tokenizer = load(cfg, ctx)
    # θu's changed tensors: at most every parameter, once in the cache and once in the run folder.
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    check_free_disk({run_dir: weights, **({ctx.cache_dir: weights} if settings.cache else {})})
    scoring = settings.scoring or benchmark.scoring
    ctx = RunContext(**{**asdict(ctx), "scoring": scoring})
    record["scoring"] = scoring
    accuracy = record.setdefault("metrics", {}).setdefault("accuracy", {})
    model_key = key_of(cfg.model, cfg.benchmark, cfg.storage, scoring, settings.bootstrap_iters)
    quantized = cfg.quantizer.quant_type != "none"

    with stage("evaluate_theta0"):
        accuracy["theta0"] = cache.json("eval", key_of(model_key, "theta0"), lambda: evaluate(
            model, tokenizer, benchmark, scoring, settings))
    if quantized:
        with stage("quantize_theta0"):
            accuracy["q_theta0"] = cache.json(
                "eval", key_of(model_key, cfg.quantizer, "q_theta0"),
                lambda: evaluate(quantize(model, cfg)[0], tokenizer, benchmark, scoring, settings))

    attribution: AttributionSettings = instantiate(cfg.attribution)
    if attribution.enabled:
        with stage("attribution_theta0"):
            theta0_attr = cache.objects(
                "attribution", key_of(model_key, cfg.attribution, "per-item-frozen"),
                lambda: attribute_theta0(model, tokenizer, benchmark, attribution, scoring, seed=0))
        ctx = RunContext(**{**asdict(ctx), "circuit": theta0_attr["circuit"]})
        record["metrics"]["circuit"] = theta0_attr["circuit"].to_json()

    theta0 = {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}
    unlearn_key = key_of(model_key, cfg.method, ctx.seed, *memory_key(cfg))
    with stage("unlearn"):
        record["metrics"]["unlearning"] = unlearn(model, tokenizer, benchmark, ctx, cfg, cache,
                                                  unlearn_key, theta0)
    with stage("evaluate_thetau"):
        accuracy["thetau"] = cache.json("eval", key_of(unlearn_key, "thetau"), lambda: evaluate(
            model, tokenizer, benchmark, scoring, settings))
    if quantized:
        with stage("quantize_thetau"):
            qmodel, quantized_state = quantize(model, cfg)
            accuracy["q_thetau"] = cache.json(
                "eval", key_of(unlearn_key, cfg.quantizer, "q_thetau"),
                lambda: evaluate(qmodel, tokenizer, benchmark, scoring, settings))
        record["metrics"]["ptq_gap"] = paired_bootstrap(
            accuracy["thetau"]["forget"]["correct"], accuracy["q_thetau"]["forget"]["correct"],
            iters=settings.bootstrap_iters, seed=ctx.seed)
        reversal_stages(record["metrics"], stage, model, quantized_state, theta0, tokenizer, benchmark,
                        scoring, settings, ctx, cfg)
    if attribution.enabled and settings.cad:
        with stage("cad"):
            record["metrics"]["cad"] = circuit_divergence(
                model, qmodel if quantized else None, tokenizer, theta0_attr, attribution,
                scoring, run_dir, scores=settings.cad_scores)
    if quantized:
        del qmodel
    # Per-question outcomes go beside the record (for paired comparisons across runs), not in it.
    atomic_write_json(run_dir / "predictions.json", {
        model_name: {split: result.pop("correct") for split, result in splits.items()}
        for model_name, splits in accuracy.items()})

    record["verdicts"] = verdicts(
        record["metrics"], min_forgetting=settings.min_forgetting,
        max_retain_drop=settings.max_retain_drop, max_ptq_gap=settings.max_ptq_gap,
        min_cad_over_floor=settings.min_cad_over_floor)
    record["status"] = "ok"
    path = atomic_write_json(run_dir / "result.json", record)
    tracker.log_record(record)
    tracker.finish(ok=True)
    table_log.info("\n%s", summary_table(record))
    log.info("%s", job_line(record, path))
    return record


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
    benchmark: Benchmark = instantiate(cfg.benchmark)
    if not benchmark.forget.questions:
        raise ValueError("the forget set is empty")
    model, tokenizer = instantiate(cfg.model, _partial_=True)(benchmark, ctx)
    model = model.to(device=ctx.device, dtype=ctx.param_dtype)
    model.eval()
    return benchmark, model, tokenizer


def evaluate(model, tokenizer, benchmark: Benchmark, scoring: str, settings: EvalSettings) -> dict:
    from mansu.evaluate.mcq import evaluate_mcq

    splits = {"forget": benchmark.forget, "retain": benchmark.retain, **benchmark.extra_retain}
    results = {}
    for name, split in splits.items():
        result = evaluate_mcq(model, tokenizer, split.questions, scoring=scoring,
                              batch_size=settings.batch_size,
                              bootstrap_iters=settings.bootstrap_iters)
        results[name] = {**result.to_json(), "correct": list(result.correct)}
    return results


def quantize(model, cfg: DictConfig) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Q(model) and its dequantized weights (float32, on CPU): dequantized once, then shared by the
    evaluation (on CPU the 4-bit layers hold them, mansu.quantize.quantizer.materialize_4bit) and the
    reversal analyses."""
    from mansu.quantize.quantizer import materialize_4bit

    qmodel = instantiate(cfg.quantizer)(model)
    return qmodel, {name: t.cpu() for name, t in materialize_4bit(qmodel).items()}


def unlearn(model, tokenizer, benchmark: Benchmark, ctx: RunContext, cfg: DictConfig,
            cache: StageCache, key: str, theta0: dict) -> dict:
    """Run the method, or reapply its cached parameter changes (one cache entry: the method's info
    and the changed tensors). θu = θ0 with these tensors replaced; the run folder gets its own copy
    of them as unlearned.safetensors."""

    def train() -> dict:
        method = instantiate(cfg.method)
        result = unlearn_with_memory_options(method, model, tokenizer, benchmark.forget,
                                             benchmark.retain, ctx, cfg)
        if result.model is not model:
            model.load_state_dict(result.model.state_dict())
        # named_parameters lists a tied weight (embeddings = lm_head) once, as safetensors needs.
        changed = {name: t.detach().cpu() for name, t in model.named_parameters()
                   if not torch.equal(t.detach().cpu(), theta0[name])}
        info = {"steps": result.steps, "losses": [float(x) for x in result.losses],
                "changed_tensors": sorted(changed), **result.info}
        return {"info": info, "changed": changed}

    stored = cache.objects("unlearn", key, train)
    changed = stored["changed"]
    missing = set(stored["info"]["changed_tensors"]) ^ set(changed)
    if missing:
        raise RuntimeError(f"unlearn entry {cache.entry('unlearn', key)}: tensors {sorted(missing)} "
                           f"do not match its list of changed tensors")
    model.load_state_dict({k: v.to(ctx.device) for k, v in changed.items()}, strict=False)
    atomic_save_tensors(ctx.run_dir / "unlearned.safetensors", changed)
    return stored["info"]


def attribution_items(questions: list, max_items: int | None, seed: int) -> list:
    if max_items is None or len(questions) <= max_items:
        return list(questions)
    import random

    return random.Random(seed).sample(list(questions), max_items)


def attribute_theta0(model, tokenizer, benchmark: Benchmark, settings: AttributionSettings,
                     scoring: str, seed: int) -> dict:
    """EAP-IG on θ0 for the forget and retain items, the circuit, and CAD's noise floors. It is
    cached per θ0, so its item sample and noise-floor splits take a fixed seed, not the run's:
    every seed of a sweep is then compared against the same circuit. The forget items are
    attributed per item once, so the floors' random halves need no further pass; θ0's gradients
    at the circuit's outputs are kept for the ``frozen`` CAD (one more pass)."""
    from mansu.attribution.circuit import mask_share, parameter_mask
    from mansu.attribution.eap_ig import attribute
    from mansu.attribution.items import attribute_items, readout_matrix, write_gradients
    from mansu.attribution.selection import select
    from mansu.cad.divergence import noise_floors, output_weights

    forget = attribution_items(benchmark.forget.questions, settings.max_items, seed)
    retain = attribution_items(benchmark.retain.questions, settings.max_items, seed)
    kwargs = settings.attribute_kwargs(scoring)
    mean_items = retain if settings.counterfactual == "mean" else None
    forget_items = attribute_items(model, tokenizer, forget, mean_items=mean_items, **kwargs)
    retain_attr = attribute(model, tokenizer, retain, mean_items=mean_items, **kwargs)
    circuit = select(model, tokenizer, forget, retain, forget_items.attribution, retain_attr,
                     attribute_kwargs={**kwargs, "mean_items": mean_items}, seed=seed,
                     **settings.selection_kwargs())
    circuit_share = mask_share(parameter_mask(model, circuit), model)
    weights = output_weights(model, circuit)
    gradients, forget_items.frozen = write_gradients(model, tokenizer, forget, weights,
                                                     mean_items=mean_items, **kwargs)
    floors = noise_floors(forget_items, circuit, weights, seed=seed)
    return {"forget_items": forget, "mean_items": mean_items,
            "forget": forget_items.keep_units(circuit), "weights": weights,
            "gradients": gradients,
            "readout": readout_matrix(model).cpu(), "circuit": circuit,
            "parameter_share": circuit_share, "noise_floors": floors}


def circuit_divergence(model, qmodel, tokenizer, theta0_attr: dict, settings, scoring: str,
                       run_dir: Path, scores: bool = True) -> dict:
    """CAD of θu (and Q(θu)) on the same items, counterfactuals and metric as θ0's attribution,
    every variant beside its own floor; the direct effects are read with θ0's unembedding and
    the frozen scores with θ0's gradients."""
    from mansu.attribution.eap_ig import plot_attribution
    from mansu.attribution.items import attribute_items
    from mansu.cad.divergence import cad_report, output_weights

    items, kwargs = theta0_attr["forget_items"], settings.attribute_kwargs(scoring)
    # With the mean counterfactual each model's own retain means are its x̃.
    kwargs["mean_items"] = theta0_attr["mean_items"]
    kwargs["readout"] = theta0_attr["readout"]
    kwargs["frozen_gradients"] = theta0_attr["gradients"]
    circuit = theta0_attr["circuit"]
    after = attribute_items(model, tokenizer, items, scores=scores, **kwargs)
    after_q = (attribute_items(qmodel, tokenizer, items, scores=scores, **kwargs)
               if qmodel is not None else None)
    if scores:  # the heatmap compares EAP-IG scores
        plot_attribution(theta0_attr["forget"].attribution, after.attribution,
                         run_dir / "attribution.png")
    report = cad_report(theta0_attr["forget"], after, circuit, weights0=theta0_attr["weights"],
                        weightsu=output_weights(model, circuit), floors=theta0_attr["noise_floors"],
                        thetaq=after_q,
                        weightsq=output_weights(qmodel, circuit) if qmodel is not None else None)
    return {**report, "circuit_parameter_share": theta0_attr["parameter_share"]}


def reversal_stages(metrics: dict, stage, model, quantized: dict, theta0: dict, tokenizer,
                    benchmark: Benchmark, scoring: str, settings: EvalSettings, ctx: RunContext,
                    cfg: DictConfig) -> None:
    """Whether quantization undid the unlearning and by what mechanism (mansu.reversal.analyses)."""
    from mansu.reversal import analyses as reversal
    from mansu.reversal.diagnostics import update_diagnostics

    thetau = model.state_dict()
    thetau_correct = metrics["accuracy"]["thetau"]["forget"]["correct"]
    common = {"scoring": scoring, "batch_size": settings.batch_size, "seed": ctx.seed}
    if settings.diagnostics:
        with stage("diagnostics"):
            metrics["diagnostics"] = update_diagnostics(
                {n: theta0[n] for n in quantized},
                {n: thetau[n].detach().cpu() for n in quantized},
                blocksize=cfg.quantizer.blocksize)
    if settings.noise_control:
        with stage("noise_control"):
            metrics["noise_control"] = reversal.noise_control(
                model, quantized, thetau_correct, tokenizer, benchmark.forget.questions,
                iters=settings.bootstrap_iters, **common)
    if settings.first_order and benchmark.forget.corpus:
        with stage("first_order"):
            metrics["first_order"] = reversal.first_order(
                model, theta0, quantized, tokenizer, benchmark.forget.corpus,
                quant_type=cfg.quantizer.quant_type, blocksize=cfg.quantizer.blocksize,
                seed=ctx.seed)
    if settings.other_formats:
        with stage("other_formats"):
            metrics["other_formats"] = reversal.format_gaps(
                model, thetau_correct, tokenizer, benchmark.forget.questions,
                formats=list(settings.other_formats), blocksize=cfg.quantizer.blocksize,
                skip_modules=list(cfg.quantizer.skip_modules), iters=settings.bootstrap_iters,
                **common)

