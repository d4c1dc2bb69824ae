"""The schemas of conf/eval/ and conf/attribution/: their keys, types and defaults (checked by
mansu.config before a run builds anything)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class EvalSettings:
    """conf/eval/: how models are scored and what the four verdicts require (docs/method.md §6)."""

    batch_size: int = 32
    bootstrap_iters: int = 1000
    scoring: str | None = None          # None = the benchmark's own scoring
    diagnostics: bool = True            # update-versus-bin diagnostics (docs/method.md §2)
    noise_control: bool = True          # θu + noise of the quantizer's own error RMS
    first_order: bool = True            # first-order split of the forget-loss change under Q
    other_formats: list[str] | None = None  # PTQ gaps under further formats, e.g. [fp4, int8]
    cache: bool = True                  # reuse stage results keyed by config
    cad: bool = True                    # CAD of θu and Q(θu) when the attribution stage runs
    cad_scores: bool = True             # EAP-IG scores of θu, Q(θu) (projection/cosine/js CAD);
                                        # false: only the gradient-free variants, ~3x cheaper
    retain_train: float = 0.4           # shares of a benchmark's retain questions without parts of
    retain_fit: float = 0.2             # its own: train / fit / the rest scored (benchmarks.parts)
    retain_split_seed: int = 0
    min_retain_eval: int = 20           # fewer scored retain questions are refused
    verdicts: Literal["deployed", "point"] = "deployed"  # protocol (mansu.verdicts)
    min_forgetting: float = 0.10
    retain_margin: float = 0.05         # deployed: non-inferiority margin of every retain split
    max_share_back: float = 0.25        # deployed: share of the forgetting NF4 may bring back
    max_retain_drop: float = 0.03       # point: retain drop of θu
    max_ptq_gap: float = 0.0            # point: PTQ gap of θu
    min_cad_over_floor: float = 0.5

    def __post_init__(self):
        for name in ("min_forgetting", "retain_margin", "max_share_back", "max_retain_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"eval.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class AttributionSettings:
    """conf/attribution/: EAP-IG on θ0 selects the forget circuit; CAD compares θu and Q(θu) to it."""

    enabled: bool = True
    counterfactual: str = "stem_swap"
    ig_steps: int = 5
    batch_size: int = 16
    neuron_block: int = 1
    select: Literal["necessity", "sufficiency"] = "sufficiency"  # rule (mansu.attribution.selection)
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

