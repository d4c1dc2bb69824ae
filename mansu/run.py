"""`mansu`: one run = load → [inject] → evaluate θ0 → unlearn → evaluate θu → quantize θ0 and θu →
evaluate both → diagnostics → record. Each stage is a plain function called in order by `run`; the
leaves (model, benchmark, method, quantizer, logger) are built from their configs' `_target_`.

Q(θ0) is built and evaluated before unlearning, so θ0 never needs a second copy on the device, and
stage results are cached by config (mansu.cache), so a sweep evaluates θ0 once and a rerun resumes.
"""

from __future__ import annotations

import logging
import secrets
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mansu.cache import StageCache, key_of
from mansu.config import ConfigError, validate, validate_top_level
from mansu.context import RunContext
from mansu.data import Benchmark, BenchmarkFileError
from mansu.distributed import init_distributed, memory_key, unlearn_with_memory_options
from mansu.models import ModelLoadError
from mansu.preflight import report as preflight_report
from mansu.record import (
    atomic_save_tensors,
    atomic_write_json,
    atomic_write_text,
    environment,
    paired_bootstrap,
    summary_table,
    verdicts,
    write_failure_record,
)
from mansu.safeguards import (
    SetupError,
    check_free_disk,
    check_writable,
    claim_run_dir,
    quiet_log_file_errors,
    release,
    release_claim,
    reserve_space,
)
from mansu.training import UnlearningDiverged

log = logging.getLogger("mansu")
stage_log = logging.getLogger("mansu.stage")  # one line per stage (run.log only in a sweep)
table_log = logging.getLogger("mansu.table")  # the run's table (run.log only in a sweep)

# Errors whose message says everything (names the key, file:line or folder): shown without their type.
CLEAR_ERRORS = (ConfigError, BenchmarkFileError, ModelLoadError, UnlearningDiverged, SetupError,
                ValueError)

# A short id of this process, in the run and sweep folder names: two runs started in the same second
# get folders of their own (conf/config.yaml: hydra.run.dir). Cached, so it resolves the same each time.
RUN_ID = secrets.token_hex(3)
OmegaConf.register_new_resolver("run_id", lambda: RUN_ID, use_cache=True, replace=True)


@dataclass
class EvalSettings:
    """conf/eval/: how models are scored and what the four verdicts require (METHOD.md §6)."""

    batch_size: int = 32
    bootstrap_iters: int = 1000
    scoring: str | None = None          # None = the benchmark's own scoring
    diagnostics: bool = True            # update-versus-bin diagnostics (METHOD.md §2)
    noise_control: bool = True          # θu + noise of the quantizer's own error RMS
    first_order: bool = True            # first-order split of the forget-loss change under Q
    other_formats: list[str] | None = None  # PTQ gaps under further formats, e.g. [fp4, int8]
    cache: bool = True                  # reuse stage results keyed by config
    cad: bool = True                    # CAD of θu and Q(θu) when the attribution stage runs
    cad_scores: bool = True             # EAP-IG scores of θu, Q(θu) (projection/cosine/js CAD);
                                        # false: only the gradient-free variants, ~3x cheaper
    min_forgetting: float = 0.10
    max_retain_drop: float = 0.03
    max_ptq_gap: float = 0.0
    min_cad_over_floor: float = 0.5


@dataclass
class AttributionSettings:
    """conf/attribution/: EAP-IG on θ0 selects the forget circuit; CAD compares θu and Q(θu) to it."""

    enabled: bool = True
    counterfactual: str = "stem_swap"
    ig_steps: int = 5
    batch_size: int = 16
    neuron_block: int = 1
    select: Literal["necessity", "sufficiency"] = "sufficiency"  # rule (mansu.selection)
    threshold: float = 0.8              # sufficiency: faithfulness the circuit must reach
    lam: float = 1.0                    # sufficiency: weight of retain in forget-specificity
    forget_removed: float = 0.5         # necessity: share of the forget metric ablation removes
    retain_removed: float = 0.2         # necessity: at most this share of the retain metric
    share_of_parameters: float = 0.005  # necessity: weights kept, share of quantized Linear weights
    max_evaluations: int = 40           # necessity: node sets tried at most
    curve_points: int = 8               # necessity: ablation curve of the plain forget ranking
    retain_floor: float = 0.1           # necessity: ε of the Fisher ratio, x mean retain Fisher
    stability: bool = True              # necessity: rerun on two halves of the forget items
    skip_modules: tuple[str, ...] = ("lm_head",)  # Linear layers left unquantized
    max_items: int | None = 256

    def selection_kwargs(self) -> dict:
        return {"rule": self.select, "threshold": self.threshold, "lam": self.lam,
                "forget_removed": self.forget_removed, "retain_removed": self.retain_removed,
                "share_of_parameters": self.share_of_parameters,
                "max_evaluations": self.max_evaluations, "curve_points": self.curve_points,
                "retain_floor": self.retain_floor, "check_stability": self.stability,
                "skip_modules": tuple(self.skip_modules), "batch_size": self.batch_size}

    def attribute_kwargs(self, scoring: str) -> dict:
        return {"scoring": scoring, "counterfactual": self.counterfactual,
                "ig_steps": self.ig_steps, "batch_size": self.batch_size,
                "neuron_block": self.neuron_block}


CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig):
    if cfg.preflight:  # memory estimate from the config alone: nothing is loaded (mansu.preflight)
        return print(preflight_report(cfg, HydraConfig.get().launcher))
    from mansu.logs import route_library_output

    route_library_output()
    return run_guarded(cfg, Path(HydraConfig.get().runtime.output_dir),
                       multirun=HydraConfig.get().mode == RunMode.MULTIRUN)


def run_guarded(cfg: DictConfig, run_dir: Path, *, multirun: bool = False) -> dict:
    """Run, and whatever happens leave a record: a failed job writes what it measured and why it
    stopped (even on a full disk); in a sweep the other jobs go on, alone it exits with one clear
    line. The traceback goes into the record, not onto the terminal."""
    record: dict = {"status": "running", "run_dir": str(run_dir)}
    try:
        claim_run_dir(run_dir)
        try:
            finished = finished_before(cfg, run_dir)
        except SetupError:
            release_claim(run_dir)
            raise
    except SetupError as err:  # the folder is another run's: write nothing into it
        record.update(status="failed", error=f"SetupError: {err}")
        if multirun:
            log.error("%s", err)
            return record
        raise SystemExit(f"mansu: error: {err}") from None
    if finished is not None:
        release_claim(run_dir)
        log.info("%s (finished before: not run again)", job_line(finished, run_dir / "result.json"))
        return finished
    quiet_log_file_errors()
    from mansu.logs import ConsoleFilter

    ConsoleFilter.in_sweep = multirun
    reserve = reserve_space(run_dir)
    try:
        run(cfg, run_dir, record)
        return record
    except Exception as caught:  # a sweep must survive any one job's failure
        err = root_cause(caught)
        message = one_line(err)
        record.update(status=getattr(err, "status", "failed"),
                      error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        path = write_failure_record(run_dir / "result.json", record, reserve)
        if multirun:
            log.error("%s (record: %s)", message, path)
            return record
        raise SystemExit(f"mansu: error: {message} (record: {path})") from None
    finally:
        release(reserve)
        release_claim(run_dir)


# Where a run writes, not what it computes: a sweep folder moved or reached through another path
# (MANSU_OUTPUTS) still holds the same finished jobs.
WHERE_KEYS = ("output_root", "cache_dir")


def finished_before(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Rerunning a sweep into its folder resumes it: a job whose folder holds a finished record of
    the same config is done and returns that record; a failed or unreadable record is kept as
    result.attempt-<n>.json and the job runs again (its finished stages come from the cache); a
    finished record of another config is refused, since the folder is that run's."""
    import json

    path = run_dir / "result.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and old.get("status") == "ok":
        try:
            config = OmegaConf.to_container(cfg, resolve=True)
        except Exception as err:  # the run would fail on it too; the finished record stays
            raise SetupError(f"the config does not resolve ({one_line(err)})") from None
        differ = [key for key in differing_keys(old.get("config", {}), config)
                  if key not in WHERE_KEYS]
        if not differ:
            return old
        restore_hydra_files(run_dir, old)
        shown = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
        raise SetupError(f"run folder {run_dir} holds a finished run of another config ({shown} "
                         f"differ); give this run its own hydra.sweep.dir or hydra.run.dir")
    attempt = 1
    while (run_dir / f"result.attempt-{attempt}.json").exists():
        attempt += 1
    path.replace(run_dir / f"result.attempt-{attempt}.json")
    return None


def restore_hydra_files(run_dir: Path, record: dict) -> None:
    """Hydra writes the new job's .hydra/config.yaml and overrides.yaml before any code of ours runs;
    a refused job puts the finished run's back (config resolved, as the record holds it)."""
    hydra_dir = run_dir / ".hydra"
    if not hydra_dir.is_dir():
        return
    atomic_write_text(hydra_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(record["config"])))
    if "overrides" in record:
        atomic_write_text(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(
            list(record["overrides"]))))


def differing_keys(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (added and removed keys too)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [key for name in sorted(set(old) | set(new), key=str)
                for key in differing_keys(old.get(name, _MISSING), new.get(name, _MISSING),
                                          f"{prefix}{name}.")]
    return [] if old == new else [prefix.rstrip(".") or "config"]


_MISSING = object()


def root_cause(err: BaseException) -> BaseException:
    """Hydra wraps a builder's error in InstantiationException; the builder's own error is the
    clear one."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    return text if isinstance(err, CLEAR_ERRORS) else f"{type(err).__name__}: {text}"


class Safeguards(Callback):
    """conf/config.yaml hydra.callbacks. Before Hydra writes anything: the output folder must be
    writable (else one line, not Hydra's traceback). After a sweep: one line per job that did not
    finish ok, and a non-zero exit when any did not: a sweep that lost jobs must not look like a
    success."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self.check_output(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.check_output(config)

    @staticmethod
    def check_output(config: DictConfig) -> None:
        try:
            check_writable(Path(config.output_root), "output folder",
                           "set output_root=... or MANSU_OUTPUTS to a writable folder")
        except SetupError as err:
            raise SystemExit(f"mansu: error: {err}") from None

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sorted(p.parent for p in sweep_dir.glob("*/.hydra"))
        problems = []
        for job in jobs:
            status, error = job_outcome(job)
            if status != "ok":
                problems.append(f"  {job.name}: {status}" + (f": {error}" if error else ""))
        lines = [f"mansu: sweep {sweep_dir}: {len(jobs) - len(problems)} of {len(jobs)} jobs ok",
                 *problems]
        print("\n".join(lines), file=sys.stderr)
        if problems:
            raise SystemExit(1)


def job_outcome(job_dir: Path) -> tuple[str, str]:
    import json

    path = job_dir / "result.json"
    if not path.is_file():
        return "no record", ""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return "unreadable record", str(err)
    return str(record.get("status")), " ".join(str(record.get("error", "")).split())[:300]


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
    from mansu.evaluation import evaluate_mcq

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
    evaluation (on CPU the 4-bit layers hold them, mansu.quantization.materialize_4bit) and the
    reversal analyses."""
    from mansu.quantization import materialize_4bit

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
    from mansu.cad import noise_floors, output_weights
    from mansu.circuit import mask_share, parameter_mask
    from mansu.eap_ig import attribute
    from mansu.item_attribution import attribute_items, readout_matrix, write_gradients
    from mansu.selection import select

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
    from mansu.cad import cad_report, output_weights
    from mansu.eap_ig import plot_attribution
    from mansu.item_attribution import attribute_items

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
    """Whether quantization undid the unlearning and by what mechanism (mansu.reversal)."""
    from mansu import reversal
    from mansu.diagnostics import update_diagnostics

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


if __name__ == "__main__":
    main()
