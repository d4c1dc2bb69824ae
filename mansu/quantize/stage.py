"""The quantization stage: Q(model) with the configured quantizer, and its dequantized weights."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from mansu.quantize.quantizer import materialize_4bit


def quantize(model, cfg: DictConfig) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Q(model) and its dequantized weights (float32, on CPU): dequantized once, then shared by the
    evaluation (on CPU the 4-bit layers hold them, mansu.quantize.quantizer.materialize_4bit) and the
    reversal analyses."""
    qmodel = instantiate(cfg.quantizer)(model)
    return qmodel, {name: t.cpu() for name, t in materialize_4bit(qmodel).items()}
