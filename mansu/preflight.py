"""Preflight: the peak memory per GPU of each stage of a run, estimated from the config alone (no
weights loaded), and the check that refuses a SLURM sweep whose jobs cannot fit their GPUs.

`mansu preflight=true <overrides>` prints the table and exits; `mansu -m ... hydra/launcher=slurm`
runs the same estimate for every job of the sweep before submitting anything (PreflightCallback).

Model sizes come from the model config: the tiny model's own knobs, `model.architecture` (the
numbers of the model's config.json, written into each conf/model/*.yaml so it works offline), or a
local `config.json` when `model.name_or_path` is a directory. What is counted, per stage:
- weights in the storage dtype (fp32: 4 bytes, bf16 / bf16_master: 2);
- gradients of the trained parameters (same dtype; bf16_master adds their fp32 copies), which
  form during backward as the activations are freed (so the two are not simply added);
- optimizer state: AdamW's two moments in the stepped dtype (fp32 masters for bf16_master: +4
  bytes), or 1 byte each for bitsandbytes' 8-bit AdamW; on a GPU torch's foreach AdamW also
  allocates one temporary of the state's size at the step;
- the frozen reference copy of θ0 (NPO, GradDiff/NPO with retain_loss=kl, RMU);
- activations saved for backward at method.batch_size × method.max_length tokens, counted from what
  a Llama decoder layer saves (norms in fp32, q/k/v, rotary, attention output, SwiGLU: 4 × the
  intermediate size), and the fp32 log-softmax of the logits; forget and retain batches share one
  graph in GradDiff/NPO/SimNPO/RMU. Gradient checkpointing keeps each layer's input only;
- quantized copies: NF4 codes (0.5 byte) + fp32 absmax per block for every quantized Linear, the
  rest (embeddings, lm_head, norms) unquantized; the noise control's extra copy of θu;
- with distributed=fsdp over N GPUs the training state (weights, gradients, optimizer state,
  reference) is divided by N, plus the all-gathered working set of two decoder layers; the other
  stages run on one GPU per rank with the whole model.
θ0 kept on CPU for the diagnostics (and the model parked there while FSDP trains) is host memory.
Checked against measured CPU peaks of the tiny and a ~100M random Llama: tests/test_preflight.py.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mansu.config import ConfigError

GIB = 2**30
EVAL_TOKENS = 256        # tokens per question assumed by the evaluation and attribution stages (a
                         # WMDP/MMLU question with its choices; a few are longer: lower eval batch sizes)
MANSU_MASK_SHARE = 0.01  # share of the quantized weights in MANSU's circuit mask (≈0.5% at 7-8B)
PARAM_BYTES = {"fp32": 4, "bf16": 2, "bf16_master": 2}


@dataclass(frozen=True)
class Architecture:
    """The numbers of a Llama-family decoder that decide its memory."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    attn_implementation: str = "sdpa"

    @classmethod
    def from_hf_config(cls, config: dict, attn_implementation: str | None = None) -> Architecture:
        heads = config["num_attention_heads"]
        return cls(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                   intermediate_size=config["intermediate_size"],
                   num_layers=config["num_hidden_layers"], num_heads=heads,
                   num_kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                   attn_implementation=attn_implementation or "sdpa")

    @property
    def layer_linear_parameters(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def parameters(self) -> int:
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.embedding_parameters + self.num_layers * self.layer_linear_parameters + norms

    @property
    def quantized_parameters(self) -> int:
        """Weights NF4 quantizes: every decoder Linear (lm_head and embeddings are skipped)."""
        return self.num_layers * self.layer_linear_parameters


def architecture_of(model_cfg: DictConfig) -> tuple[Architecture, str]:
    """The model's architecture and where its numbers came from."""
    target = model_cfg.get("_target_", "")
    if target.endswith("load_tiny"):
        m = model_cfg
        return Architecture(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                            intermediate_size=m.intermediate_size, num_layers=m.num_layers,
                            num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                            head_dim=m.hidden_size // m.num_heads), "model config (tiny knobs)"
    attn = model_cfg.get("attn_implementation")
    name = model_cfg.get("name_or_path")
    if name and (Path(os.path.expanduser(name)) / "config.json").is_file():
        path = Path(os.path.expanduser(name)) / "config.json"
        return Architecture.from_hf_config(json.loads(path.read_text()), attn), str(path)
    numbers = model_cfg.get("architecture")
    if numbers:
        return (Architecture.from_hf_config(OmegaConf.to_container(numbers), attn),
                "model.architecture (config YAML)")
    raise ConfigError("preflight: no architecture numbers for this model: give model.name_or_path="
                      "a local directory with config.json, or add model.architecture "
                      "(the config.json numbers) to its YAML")


@dataclass(frozen=True)
class TrainingProfile:
    """What a method keeps in memory while it trains."""

    trained: int          # parameters with gradients and optimizer state
    reference: bool       # a frozen copy of θ0 on the device
    batches: int          # text batches alive in one autograd graph (forget, retain)
    ref_logits: bool = False  # KL retain term: the reference's fp32 logits of the retain batch
    sharded: bool = True  # distributed=fsdp applies (MANSU keeps its sparse state unsharded)
    retain_grads: int = 0  # MANSU: retain gradients of the masked entries (fp32) for its null space


def training_profile(method_cfg: DictConfig, arch: Architecture) -> TrainingProfile | None:
    target = method_cfg.get("_target_", "")
    name = target.split(".")[-2] if "." in target else target
    every = (arch.parameters if method_cfg.get("train_embeddings", True)
             else arch.parameters - arch.embedding_parameters)
    retain = method_cfg.get("retain_loss", "nll")
    if name == "none":
        return None
    if name == "ga":
        return TrainingProfile(every, reference=False, batches=1)
    if name == "graddiff":
        return TrainingProfile(every, reference=retain == "kl", batches=2, ref_logits=retain == "kl")
    if name == "npo":
        return TrainingProfile(every, reference=True, batches=1 + (retain != "none"),
                               ref_logits=retain == "kl")
    if name == "simnpo":
        return TrainingProfile(every, reference=False, batches=1 + (retain != "none"))
    if name == "rmu":
        return TrainingProfile(3 * arch.hidden_size * arch.intermediate_size, reference=True,
                               batches=2)
    if name == "sure":
        norms = (2 * arch.num_layers + 1) * arch.hidden_size
        return TrainingProfile(every - norms, reference=False, batches=1)
    if target.startswith("mansu.unlearn.mansu"):
        masked = int(arch.quantized_parameters * MANSU_MASK_SHARE)
        return TrainingProfile(masked, reference=False, batches=1, sharded=False,
                               retain_grads=masked * method_cfg.get("n_retain", 64))
    # A method without a profile here: assume full-parameter training with a reference.
    return TrainingProfile(every, reference=True, batches=2)


@dataclass
class Stage:
    name: str
    parts: dict[str, float] = field(default_factory=dict)  # bytes per GPU

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass
class Estimate:
    arch: Architecture
    source: str
    stages: list[Stage]
    host: dict[str, float]
    settings: dict

    @property
    def peak(self) -> Stage:
        return max(self.stages, key=lambda s: s.total)

    def fits(self, gpu_memory_gb: float) -> bool:
        return self.peak.total <= gpu_memory_gb * GIB

    def table(self, gpu_memory_gb: float | None = None) -> str:
        s = self.settings
        lines = [f"preflight: {self.arch.parameters / 1e9:.3g}B parameters ({self.source}); "
                 f"method {s['method']}, storage {s['storage']}, optimizer {s['optimizer']}, "
                 f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
                 f"{s['gpus']} GPU(s), distributed {s['distributed']}",
                 f"{'stage':22s} {'GiB/GPU':>8s}  parts (GiB)"]
        for stage in self.stages:
            parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in stage.parts.items() if v)
            lines.append(f"{stage.name:22s} {stage.total / GIB:8.2f}  {parts}")
        host = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.host.items())
        lines.append(f"host memory (CPU RAM): {host}")
        verdict = ""
        if gpu_memory_gb is not None:
            verdict = (f"; fits {gpu_memory_gb:g} GB" if self.fits(gpu_memory_gb)
                       else f"; does NOT fit {gpu_memory_gb:g} GB")
        lines.append(f"peak per GPU: {self.peak.total / GIB:.2f} GiB ({self.peak.name}){verdict}")
        return "\n".join(lines)


def activation_bytes(arch: Architecture, tokens: int, value_bytes: int, *, training: bool,
                     checkpointing: bool = False, sequence: int = 0) -> float:
    """Bytes saved for backward (training) or alive at once (inference) for `tokens` tokens."""
    h, i, s = arch.hidden_size, arch.intermediate_size, value_bytes
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    if not training:  # one layer at a time: hidden states, q/k/v, the MLP's three intermediates
        return tokens * s * (4 * h + q + 2 * kv + 3 * i)
    # Bytes per token saved by one decoder layer, as measured with the torch profiler on CPU for
    # fp32 and bf16 over several shapes (h, i, kv varied one at a time): the two RMSNorms keep an
    # fp32 copy and the normed output (2h(4 + s)); q/k/v, rotary and attention outputs 4q + 2kv;
    # SwiGLU's gate, up, act(gate) and product 4i; plus per-token scalars.
    layer = tokens * (2 * h * (4 + s) + s * (4 * q + 2 * kv + 4 * i) + 24)
    if arch.attn_implementation == "eager" and sequence:
        layer += tokens * arch.num_heads * sequence * s * 2   # softmax weights + their dropout
    # fp32 log-softmax of the logits (saved), and at the start of backward its fp32 gradient and
    # the gradient of its input; the final norm and the embedding output.
    logits = tokens * (12 * arch.vocab_size + h * (2 * s + 4.5))
    if checkpointing:  # each layer's input is kept; one layer is recomputed during backward
        return tokens * h * s * arch.num_layers + layer + logits
    return layer * arch.num_layers + logits


def quantized_bytes(arch: Architecture, param_bytes: int, blocksize: int = 64) -> float:
    q = arch.quantized_parameters
    return q * 0.5 + q / blocksize * 4 + (arch.parameters - q) * param_bytes


def estimate(cfg: DictConfig, launcher: DictConfig | None = None, *, gpus: int | None = None
             ) -> Estimate:
    """The per-stage peak memory of one job of `cfg` on the GPUs `launcher` gives a job (or the
    config's own hydra.launcher; `gpus` overrides both)."""
    arch, source = architecture_of(cfg.model)
    storage = cfg.storage
    p = PARAM_BYTES[storage]
    optimizer = cfg.get("optimizer", "adamw")
    checkpointing = bool(cfg.get("gradient_checkpointing", False))
    distributed = cfg.get("distributed", "none")
    gpus = gpus or job_gpus(cfg, launcher)
    device = cfg.get("device", "auto")
    on_gpu = device != "cpu"
    weights = arch.parameters * p
    method = cfg.method
    batch, length = method.get("batch_size", 4), method.get("max_length", 512)
    eval_act = activation_bytes(arch, cfg.eval.get("batch_size", 32) * EVAL_TOKENS, p,
                                training=False)
    attribution_on = cfg.get("attribution") is not None and cfg.attribution.get("enabled", False)
    attr_act = activation_bytes(arch, cfg.attribution.get("batch_size", 16) * EVAL_TOKENS, p,
                                training=True) if attribution_on else 0.0
    quantized = cfg.quantizer.get("quant_type", "nf4") != "none"
    qcopy = quantized_bytes(arch, p, cfg.quantizer.get("blocksize", 64)) if quantized else 0.0

    stages = [Stage("evaluate_theta0", {"weights": weights, "activations": eval_act})]
    if quantized:
        stages.append(Stage("quantize_theta0", {"weights": weights, "quantized copy": qcopy,
                                                "activations": eval_act}))
    if attribution_on:
        stages.append(Stage("attribution_theta0", {"weights": weights, "activations": attr_act}))
    profile = training_profile(method, arch)
    host = {"θ0 on CPU": weights}
    if profile is not None:
        shards = gpus if distributed == "fsdp" and profile.sharded else 1
        if distributed == "fsdp":
            host["model parked on CPU while FSDP trains"] = weights
        stages.append(Stage("unlearn", training_parts(arch, profile, storage, optimizer, shards,
                                                      batch, length, checkpointing, on_gpu)))
    stages.append(Stage("evaluate_thetau", {"weights": weights, "activations": eval_act}))
    if quantized:
        stages.append(Stage("quantize_thetau", {"weights": weights, "quantized copy": qcopy,
                                                "activations": eval_act}))
        if cfg.eval.get("noise_control", True):
            stages.append(Stage("noise_control", {"weights": weights, "quantized copy": qcopy,
                                                  "noisy copy of θu": weights,
                                                  "activations": eval_act}))
    if attribution_on:
        stages.append(Stage("cad", {"weights": weights, "quantized copy": qcopy,
                                    "activations": attr_act}))
    settings = {"method": method.get("_target_", "?").rsplit(".", 1)[0], "storage": storage,
                "optimizer": optimizer, "gradient_checkpointing": checkpointing, "gpus": gpus,
                "distributed": distributed}
    return Estimate(arch, source, stages, host, settings)


def training_parts(arch: Architecture, profile: TrainingProfile, storage: str, optimizer: str,
                   shards: int, batch: int, length: int, checkpointing: bool, on_gpu: bool
                   ) -> dict[str, float]:
    p = PARAM_BYTES[storage]
    n = profile.trained
    stepped = 4 if storage in ("fp32", "bf16_master") else 2   # dtype AdamW's moments take
    moments = 2 * n * (1 if "8bit" in optimizer else stepped)
    master = n * 4 if storage == "bf16_master" else 0
    grads = n * p + (n * 4 if storage == "bf16_master" else 0)
    tokens = batch * length
    act = profile.batches * activation_bytes(arch, tokens, p, training=True,
                                             checkpointing=checkpointing, sequence=length)
    if profile.ref_logits:
        act += tokens * arch.vocab_size * 4
    # Gradients form during backward while the saved activations are freed: the peak is the
    # activations plus the first gradients (lm_head), or all gradients plus one layer's
    # activations, or, at the step, all gradients plus torch's foreach AdamW temporary of the
    # state's size (the default on GPUs; on CPU it steps one tensor at a time).
    layer_act = act / max(arch.num_layers, 1)
    first_grads = min(n, arch.vocab_size * arch.hidden_size) * p
    step_temporary = n * stepped if on_gpu and "8bit" not in optimizer else 0
    backward = max(act + first_grads / shards, (grads + step_temporary) / shards + layer_act)
    layer = arch.layer_linear_parameters * p
    parts = {"weights": arch.parameters * p / shards,
             "optimizer state": (moments + master) / shards,
             "frozen reference": arch.parameters * p / shards if profile.reference else 0.0,
             "gradients + activations (backward peak)": backward}
    if shards > 1:  # FSDP all-gathers one decoder layer while prefetching the next
        parts["FSDP gathered layers"] = 2 * max(layer, arch.vocab_size * arch.hidden_size * p)
    if profile.retain_grads:
        parts["retain gradients (null space)"] = profile.retain_grads * 4
    return parts


def job_gpus(cfg: DictConfig, launcher: DictConfig | None = None) -> int:
    """GPUs one job trains on: the launcher's gpus_per_node × nodes under distributed=fsdp."""
    if cfg.get("distributed", "none") != "fsdp":
        return 1
    if launcher is None:
        launcher = OmegaConf.select(cfg, "hydra.launcher", default=None) or {}
    per_node = launcher.get("gpus_per_node") or 1
    return int(per_node) * int(launcher.get("nodes") or 1)


def gpu_memory_gb(cfg: DictConfig) -> float | None:
    value = OmegaConf.select(cfg, "cluster.gpu_memory_gb", default=None)
    return None if value is None else float(value)


def report(cfg: DictConfig, launcher: DictConfig | None = None) -> str:
    """What `mansu preflight=true` prints: the estimate on the job's GPUs."""
    return estimate(cfg, launcher).table(gpu_memory_gb(cfg))


def check_sweep(job_configs: list[tuple[str, DictConfig]], gpu_gb: float | None) -> list[str]:
    """One line per job that does not fit `gpus_per_node × gpu_gb` (empty when all fit)."""
    if gpu_gb is None:
        return []
    failures = []
    for label, cfg in job_configs:
        est = estimate(cfg)
        if not est.fits(gpu_gb):
            failures.append(f"{label}: peak {est.peak.total / GIB:.1f} GiB per GPU in stage "
                            f"{est.peak.name} > {gpu_gb:g} GB "
                            f"({est.settings['gpus']} GPU(s), distributed "
                            f"{est.settings['distributed']})")
    return failures


def ceil_gib(nbytes: float) -> int:
    return math.ceil(nbytes / GIB)


def sweep_job_configs(config: DictConfig) -> list[tuple[str, DictConfig]]:
    """Every job of a multirun, composed the way Hydra's basic sweeper and its launcher do."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(arguments)
    loader = GlobalHydra.instance().config_loader()
    jobs = []
    for batch in BasicSweeper.split_arguments(parsed, None):
        for overrides in batch:
            label = " ".join(o for o in overrides if o.split("=")[0] in params) or "job"
            jobs.append((label, loader.load_sweep_config(config, list(overrides))))
    return jobs


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1
    Callback = object


class PreflightCallback(Callback):
    """Before a sweep launches: with preflight=true print every job's estimate and stop; on SLURM
    refuse to submit when a job's peak exceeds its GPUs (cluster.gpu_memory_gb each)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        slurm = "slurm" in str(config.hydra.launcher.get("_target_", "")).lower()
        if not (slurm or config.get("preflight")):
            return
        jobs = sweep_job_configs(config)
        if config.get("preflight"):
            for label, job in jobs:
                print(f"== {label}\n{report(job)}\n")
            raise SystemExit(0)  # SystemExit passes through Hydra's callback error handling
        failures = check_sweep(jobs, gpu_memory_gb(config))
        if failures:
            raise SystemExit("mansu: error: refusing to submit: these jobs do not fit their GPUs "
                             "(see `mansu preflight=true ...`; try distributed=fsdp with "
                             "hydra/launcher=slurm_fsdp, gradient_checkpointing=true or "
                             "optimizer=adamw_8bit):\n  " + "\n  ".join(failures))
