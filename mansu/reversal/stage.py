"""The reversal stage: whether quantization undid the unlearning, and by what mechanism."""

from __future__ import annotations

from omegaconf import DictConfig

from mansu.context import RunContext
from mansu.data import Benchmark
from mansu.reversal import analyses as reversal
from mansu.reversal.diagnostics import update_diagnostics
from mansu.settings import EvalSettings


def reversal_stages(metrics: dict, stage, model, quantized: dict, theta0: dict, tokenizer,
                    benchmark: Benchmark, scoring: str, settings: EvalSettings, ctx: RunContext,
                    cfg: DictConfig) -> None:
    """The update-versus-bin diagnostics, the matched-noise control, the first-order split of the
    forget-loss change, and the gaps under further formats, each as its own timed stage."""
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
