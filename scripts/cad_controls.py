"""CAD's controls (mansu.cad.controls) on a configured model: downstream suppression, erasure in
the circuit, no change, a random edit; each CAD variant's value minus its own noise floor, and β.

Usage: python scripts/cad_controls.py [hydra overrides] [--out FILE.json]
  python scripts/cad_controls.py                                    # the embedded tiny model
  python scripts/cad_controls.py experiment=smollm2_cpu --lr 1e-3 --max-steps 100
      (SmolLM2, the experiment's necessity circuit: 5 nodes, 0.5% of the weights)
  python scripts/cad_controls.py experiment=smollm2_cpu attribution.select=sufficiency \\
      attribution.max_items=16 attribution.threshold=0.5 --lr 1e-3 --max-steps 150
Prints a Markdown table; the chosen definition (mansu.cad.divergence.DEFINITION) must give
erasure − suppression ≥ 0.3, none and random near 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from mansu.attribution.stage import attribution_items  # noqa: E402
from mansu.cad.controls import CONTROLS, OBJECTIVES, run_controls  # noqa: E402
from mansu.cad.divergence import DEFINITION, VARIANTS  # noqa: E402
from mansu.cli import CONF_DIR
from mansu.run import load, make_context  # noqa: E402


def table(result: dict) -> str:
    floors = result["floors"]
    header = ["control", "β", "max |Δz| circuit", *[f"{v} − floor" for v in VARIANTS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in CONTROLS:
        control = result["controls"][name]
        report = control["report"]
        cells = [name, f"{report['beta']:.3f}", f"{control['circuit_activation_max_change']:.3g}"]
        cells += [f"{report['variants'][v]['minus_floor']:+.3f}" for v in VARIANTS]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["floor [95%]", "", ""] + [
        f"{f['value']:.3f} [{f['ci_low']:.3f}, {f['ci_high']:.3f}]"
        for f in (floors["variants"][v] for v in VARIANTS)]
    lines.append("| " + " | ".join(cells) + " |")
    sup, era = (result["controls"][c]["report"]["variants"] for c in ("suppression", "erasure"))
    margins = ", ".join(f"{v} {era[v]['value'] - sup[v]['value']:+.3f}" for v in VARIANTS)
    return "\n".join(lines) + (f"\n\nerasure − suppression: {margins} (chosen: {DEFINITION}); "
                               f"floor: {floors['items_per_half']} items per half, "
                               f"{floors['splits']} random splits; circuit "
                               f"{result['circuit']['size']} nodes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--target-beta", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--objective", choices=OBJECTIVES, default="contrast")
    args = parser.parse_args(argv)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=args.overrides)
    started = time.perf_counter()
    ctx = make_context(cfg, Path("outputs/cad_controls"))
    benchmark, model, tokenizer = load(cfg, ctx)
    settings = instantiate(cfg.attribution)
    scoring = cfg.eval.scoring or benchmark.scoring
    forget = attribution_items(benchmark.forget.questions, settings.max_items, 0)
    retain = attribution_items(benchmark.retain.questions, settings.max_items, 0)
    result = run_controls(model, tokenizer, forget, retain,
                          attribute_kwargs=settings.attribute_kwargs(scoring),
                          selection=settings.selection_kwargs(),
                          target_beta=args.target_beta, lr=args.lr, max_steps=args.max_steps,
                          objective=args.objective,
                          splits=args.splits)
    result["settings"] = {"overrides": args.overrides, "items": len(forget), "scoring": scoring,
                          "target_beta": args.target_beta, "lr": args.lr,
                          "objective": args.objective,
                          "seconds": round(time.perf_counter() - started, 1)}
    print(table(result))
    print(json.dumps({name: {k: v for k, v in c.items() if k != "report"}
                      for name, c in result["controls"].items()}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
