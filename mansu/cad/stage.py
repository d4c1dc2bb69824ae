"""The CAD stage: does θ0's forget circuit still compute the forget signal in θu and Q(θu)?"""

from __future__ import annotations

from pathlib import Path

from mansu.attribution.eap_ig import plot_attribution
from mansu.attribution.items import attribute_items
from mansu.cad.divergence import cad_report, output_weights


def circuit_divergence(model, qmodel, tokenizer, theta0_attr: dict, settings, scoring: str,
                       run_dir: Path, scores: bool = True) -> dict:
    """CAD of θu (and Q(θu)) on the same items, counterfactuals and metric as θ0's attribution,
    every variant beside its own floor; the direct effects are read with θ0's unembedding and
    the frozen scores with θ0's gradients."""
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
