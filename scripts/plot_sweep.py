"""Plots of a sweep: PTQ gap per method with its 95% interval beside the noise control; the
bin/update ratio (p10, median, p90) per method on a log axis; and the headline figure, forget
accuracy θ0 → θu → Q(θu) per method beside the PTQ gaps.

Usage: python scripts/plot_sweep.py outputs/sweeps/<date>
       → <sweep>/ptq_gap.png, bin_update.png, headline.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tables import load_records, pooled_gap  # noqa: E402


def groups(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        label = f"{r['choices'].get('method')}\n{r['storage']}"
        out.setdefault(label, []).append(r)
    return out


def plot_gaps(by_label: dict[str, list[dict]], path: Path) -> None:
    labels = list(by_label)
    gaps = [pooled_gap(members) for members in by_label.values()]
    noise = [sum(m["metrics"].get("noise_control", {}).get("value", 0.0) for m in members)
             / len(members) for members in by_label.values()]
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(labels)), 3.5))
    ax.errorbar(x, [g[0] for g in gaps], yerr=[[g[0] - g[1] for g in gaps],
                                               [g[2] - g[0] for g in gaps]],
                fmt="o", capsize=4, label="PTQ gap (95% CI)")
    ax.scatter(x, noise, marker="x", color="grey", label="noise control")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("forget acc: Q(θu) − θu")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_headline(by_label: dict[str, list[dict]], path: Path) -> None:
    """Left: mean forget accuracy of θ0, θu and Q(θu) per method (does it forget, does NF4 bring
    it back); right: the PTQ gap with its interval beside the noise control."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    stages = [("theta0", "θ0"), ("thetau", "θu"), ("q_thetau", "Q(θu)")]
    for i, (label, members) in enumerate(by_label.items()):
        means = [sum(m["metrics"]["accuracy"][key]["forget"]["accuracy"] for m in members)
                 / len(members) for key, _ in stages]
        left.plot(range(3), means, marker="o", color=f"C{i}", label=label.replace("\n", " "))
    left.set_xticks(range(3), [name for _, name in stages])
    left.set_ylabel("forget accuracy")
    left.set_ylim(0, 1.02)
    left.legend(fontsize=8)
    gaps = [pooled_gap(members) for members in by_label.values()]
    noise = [sum(m["metrics"].get("noise_control", {}).get("value", 0.0) for m in members)
             / len(members) for members in by_label.values()]
    x = range(len(by_label))
    right.errorbar(x, [g[0] for g in gaps], yerr=[[g[0] - g[1] for g in gaps],
                                                  [g[2] - g[0] for g in gaps]],
                   fmt="o", capsize=4, label="PTQ gap (95% CI)")
    right.scatter(x, noise, marker="x", color="grey", label="noise control")
    right.axhline(0, color="black", lw=0.8)
    right.set_xticks(list(x), list(by_label), fontsize=8)
    right.set_ylabel("forget acc: Q(θu) − θu")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bin_update(by_label: dict[str, list[dict]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(by_label)), 3.5))
    for i, members in enumerate(by_label.values()):
        for r in members:
            d = r["metrics"].get("diagnostics") or {}
            if d.get("bin_update_ratio_median") is None:
                continue
            ax.vlines(i, d["bin_update_ratio_p10"], d["bin_update_ratio_p90"], color="C0", lw=3,
                      alpha=0.4)
            ax.scatter(i, d["bin_update_ratio_median"], color="C0", zorder=3)
    ax.axhline(1, color="black", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(by_label)), list(by_label), fontsize=8)
    ax.set_ylabel("NF4 bin width / |update|  (p10–p90, median)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    records, _ = load_records(args.sweep_dir)
    records = [r for r in records if "q_thetau" in r["metrics"]["accuracy"]]
    if not records:
        print(f"no quantized records under {args.sweep_dir}", file=sys.stderr)
        return 1
    by_label = groups(records)
    plot_gaps(by_label, args.sweep_dir / "ptq_gap.png")
    plot_bin_update(by_label, args.sweep_dir / "bin_update.png")
    plot_headline(by_label, args.sweep_dir / "headline.png")
    print(f"wrote {args.sweep_dir / 'headline.png'}, ptq_gap.png and bin_update.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
