"""Turn a sweep's result records into one table: Markdown on stdout, CSV and LaTeX beside it.

Usage: python scripts/make_tables.py outputs/sweeps/<date>   [--out DIR] [--brief] [--by method.lr]

One row per (model, benchmark, method, storage, quantizer) group, split further by any config keys
given with --by (dotted, e.g. method.lr for a tuning sweep); numbers are means over the group's
seeds. The PTQ-gap interval is a paired bootstrap over questions with each question's gap
averaged over seeds (from each run's predictions.json), so seeds tighten it as they should; the
deployed protocol's permanence outcome is judged once over every seed's questions pooled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

GROUP = ["model", "benchmark", "method", "storage", "quantizer"]
MARK = {True: "✓", False: "✗", None: "–"}
VERDICTS = ("forgetting", "retain_preservation", "quantization_permanence", "structural_erasure")


def load_records(sweep_dir: Path) -> tuple[list[dict], list[str]]:
    """The finished records, and one line for every job folder without one: failed, unreadable, or
    missing (a job killed before it could write, or never started)."""
    records, skipped = [], []
    job_dirs = {p.parent for pattern in (".hydra", "result.json") for p in sweep_dir.rglob(pattern)}
    for job in sorted(job_dirs):
        path = job / "result.json"
        if not path.is_file():
            skipped.append(f"{job.name}: no record ({path} is missing)")
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            skipped.append(f"{job.name}: unreadable record {path}: {err}")
            continue
        if record.get("status") != "ok":
            error = " ".join(str(record.get("error", "")).split())
            skipped.append(f"{job.name}: {record.get('status')}: {error}")
            continue
        record["_dir"] = job
        records.append(record)
    return records, skipped


def config_value(record: dict, dotted: str):
    value = record.get("config", {})
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def row_of(record: dict, by: tuple[str, ...] = ()) -> dict:
    m, acc = record["metrics"], record["metrics"]["accuracy"]
    diag = m.get("diagnostics", {})
    row = {**{g: record.get("choices", {}).get(g) for g in ("model", "benchmark", "method")},
           "storage": record["storage"], "quantizer": record["quantizer"],
           **{key: config_value(record, key) for key in by}, "seed": record["seed"]}
    for key, label in (("theta0", "θ0"), ("thetau", "θu"), ("q_theta0", "Q(θ0)"),
                       ("q_thetau", "Q(θu)")):
        if key in acc:
            row[f"forget {label}"] = acc[key]["forget"]["accuracy"]
            row[f"retain {label}"] = acc[key]["retain"]["accuracy"]
            if "mmlu" in acc[key]:
                row[f"mmlu {label}"] = acc[key]["mmlu"]["accuracy"]
    row["noise gap"] = m.get("noise_control", {}).get("value")
    for fmt, result in (m.get("other_formats") or {}).items():
        row[f"{fmt} gap"] = result["ptq_gap"]["value"]
        row[f"{fmt} noise"] = result["noise_control"]["value"]
    row["bin/update median"] = diag.get("bin_update_ratio_median")
    row["flips (moved)"] = diag.get("code_flip_share_moved")
    row["calibration slope"] = diag.get("flip_calibration_slope")
    row["carried share"] = diag.get("carried_share")
    row["moved share"] = diag.get("moved_share")
    unlearning = m.get("unlearning", {})
    # The share of quantized weights the run changed: MANSU writes only its floored entries.
    row["updated share"] = (unlearning.get("updated") or {}).get("share_of_quantized",
                                                                diag.get("moved_share"))
    row["budget dropped"] = (unlearning.get("budget") or {}).get("dropped")
    retain_loss = unlearning.get("retain_loss") or {}
    row["retain ΔNLL predicted"] = retain_loss.get("predicted_increase")
    row["retain ΔNLL held out"] = retain_loss.get("measured_heldout")
    cad = m.get("cad", {})
    row["β"] = cad.get("beta")
    row["CAD − floor"] = cad.get("cad_minus_floor")  # the definition the verdict uses (cad.definition)
    row["CAD Q(θu) − floor"] = cad.get("cad_q_minus_floor")  # the deployed protocol's
    row["CAD_proj − floor"] = cad.get("variants", {}).get("projection", {}).get("minus_floor")
    row["floor certificate"] = (m.get("unlearning", {}).get("certificate") or {}).get("code_flip_share")
    for name, verdict in record.get("verdicts", {}).items():
        row[f"v:{name}"] = verdict["holds"]
    verdicts = record.get("verdicts", {})
    if "outcome" in verdicts.get("quantization_permanence", {}):  # the deployed protocol's
        row["permanence"] = verdicts["quantization_permanence"]["outcome"]
        forgetting = verdicts.get("forgetting", {})
        row["answer avoidance"] = forgetting.get("answer_avoidance")
        row["forget Q(θu) − chance"] = forgetting.get("distance_to_chance")
        # the lower bound of the worst retain split's paired difference
        row["retain low"] = verdicts.get("retain_preservation", {}).get("value")
    return row


def pooled_gap(records: list[dict], iters: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """PTQ gap averaged over seeds per question, with a 95% bootstrap interval over questions."""
    per_seed = []
    for record in records:
        predictions = json.loads((record["_dir"] / "predictions.json").read_text())
        if "q_thetau" not in predictions:
            return (np.nan, np.nan, np.nan)
        per_seed.append(np.asarray(predictions["q_thetau"]["forget"], float)
                        - np.asarray(predictions["thetau"]["forget"], float))
    gaps = np.mean(per_seed, axis=0)
    rng = np.random.default_rng(seed)
    means = gaps[rng.integers(0, gaps.size, size=(iters, gaps.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(gaps.mean()), float(low), float(high)


def pooled_permanence(records: list[dict], iters: int = 2000, seed: int = 0) -> dict | None:
    """The deployed protocol's permanence verdict (mansu.verdicts) over the questions of every
    seed pooled: each (seed, question) is one resampling unit, so seeds tighten the interval."""
    from mansu.verdicts import permanence_verdict

    if not all("outcome" in r.get("verdicts", {}).get("quantization_permanence", {})
               for r in records):
        return None
    pooled: dict[str, list] = {k: [] for k in ("theta0", "thetau", "q_theta0", "q_thetau")}
    for record in records:
        predictions = json.loads((record["_dir"] / "predictions.json").read_text())
        if not set(pooled) <= set(predictions):
            return None
        for model in pooled:
            pooled[model] += predictions[model]["forget"]
    forget = {k: np.asarray(v, dtype=float) for k, v in pooled.items()}
    n = len(forget["theta0"])
    resamples = np.random.default_rng(seed).integers(0, n, size=(iters, n))
    noise = [r["metrics"].get("noise_control", {}).get("value") for r in records]
    noise_control = {"value": float(np.mean(noise))} if None not in noise else None
    knobs = records[0].get("config", {}).get("eval", {})
    return permanence_verdict(forget, resamples, knobs.get("min_forgetting", 0.10),
                              knobs.get("max_share_back", 0.25), noise_control)


def build_table(records: list[dict], by: tuple[str, ...] = ()) -> pd.DataFrame:
    rows = pd.DataFrame([row_of(r, by) for r in records])
    groups, out = GROUP + list(by), []
    for keys, group in rows.groupby(groups, dropna=False, sort=False):
        members = [records[i] for i in group.index]
        numeric = group.drop(columns=groups + ["seed"]).apply(pd.to_numeric, errors="coerce")
        row = dict(zip(groups, keys)) | {"seeds": len(group)} | numeric.mean().to_dict()
        row["PTQ gap"], row["gap low"], row["gap high"] = pooled_gap(members)
        permanence = pooled_permanence(members)
        if permanence is not None:  # over every seed's questions at once
            row["permanence"] = permanence["outcome"]
            row["share back"] = permanence["value"]
            row["share high"] = permanence["share_ci"][1]
        for col in [c for c in group.columns if c.startswith("v:")]:
            held = group[col].tolist()
            row[col] = (None if any(h is None for h in held) else all(held) if len(set(held)) == 1
                        else f"{sum(held)}/{len(held)}")  # held in some seeds: say how many
        if permanence is not None:
            row["v:quantization_permanence"] = permanence["holds"]
        out.append(row)
    table = pd.DataFrame(out)
    varying = [c for c in GROUP if table[c].nunique(dropna=False) > 1] or ["method"]
    return table.drop(columns=[c for c in GROUP if c not in varying and c not in by])


COUNTS = ("budget dropped",)  # entry counts: whole numbers with thousands separators


def markdown(table: pd.DataFrame, by: tuple[str, ...] = (), columns: tuple[str, ...] = ()) -> str:
    def cell(col, value):
        if col.startswith("v:"):
            return value if isinstance(value, str) else MARK[None if pd.isna(value) else bool(value)]
        if isinstance(value, float):
            if np.isnan(value):
                return "–"
            if col in by:  # a config value as given (an lr of 3e-05 is not 0.000)
                return f"{value:g}"
            if col in COUNTS:
                return f"{value:,.0f}"
            if col == "updated share":  # MANSU writes under 0.1% of the weights
                return f"{value:.4f}"
            return f"{value:.3g}×" if col == "bin/update median" else f"{value:.3f}"
        return str(value)

    shown = table.copy()
    if "PTQ gap" in shown:
        shown["PTQ gap"] = [f"{g:+.3f} [{lo:+.3f}, {hi:+.3f}]" if not np.isnan(g) else "–"
                            for g, lo, hi in zip(shown["PTQ gap"], shown["gap low"],
                                                 shown["gap high"])]
        shown = shown.drop(columns=["gap low", "gap high"])
    shown = shown.dropna(axis=1, how="all")
    cols = list(shown.columns)
    if columns:  # the row's keys first, then the chosen columns in the given order
        keys = [c for c in cols if c in GROUP or c in by or c == "seeds"]
        cols = keys + [c for c in columns if c in shown.columns and c not in keys]
    if "PTQ gap" in cols and "noise gap" in cols:  # the gap beside its noise control
        cols.remove("PTQ gap")
        cols.insert(cols.index("noise gap"), "PTQ gap")
    lines = ["| " + " | ".join(c.removeprefix("v:") for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in shown.iterrows():
        lines.append("| " + " | ".join(cell(c, r[c]) for c in cols) + " |")
    return "\n".join(lines)


BRIEF_ROWS = ["forget θ0", "forget θu", "forget Q(θu)", "forget Q(θu) − chance", "retain θ0",
              "retain θu", "retain Q(θu)", "mmlu θ0", "mmlu Q(θu)", "retain low", "PTQ gap",
              "noise gap", "share back", "updated share", "CAD − floor", "CAD Q(θu) − floor",
              "v:forgetting", "answer avoidance", "v:retain_preservation",
              "v:quantization_permanence", "permanence", "v:structural_erasure"]


def brief(table: pd.DataFrame) -> str:
    """The headline numbers side by side: one row per number, one column per method."""
    names = [str(m) for m in table.get("method", pd.Series(range(len(table))))]
    rows = []
    for key in [k for k in BRIEF_ROWS if k in table]:
        cells = []
        for _, r in table.iterrows():
            value = r[key]
            if key.startswith("v:"):
                cells.append(f"holds {value}" if isinstance(value, str) else "–" if pd.isna(value)
                             else "holds" if value else "FAILS")
            elif isinstance(value, str | bool):
                cells.append(str(value))
            elif key == "PTQ gap":
                cells.append("–" if np.isnan(value) else
                             f"{value:+.3f} [{r['gap low']:+.3f}, {r['gap high']:+.3f}]")
            elif isinstance(value, float) and not np.isnan(value):
                cells.append(f"{value:+.3f}" if "gap" in key or "CAD" in key else
                             f"{value:.4f}" if "share" in key else f"{value:.3f}")
            else:
                cells.append("–")
        rows.append((key.removeprefix("v:"), cells))
    width = max(len(c) + 2 for cells in [names, *(cells for _, cells in rows)] for c in cells)
    lines = [f"{'':<24}" + "".join(f"{n:>{width}}" for n in names)]
    lines += [f"{label:<24}" + "".join(f"{c:>{width}}" for c in cells) for label, cells in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: the sweep dir")
    parser.add_argument("--brief", action="store_true",
                        help="print only the headline columns, one column per method")
    parser.add_argument("--columns", default="", help="only these columns (comma-separated, "
                                                       "as in the header, verdicts without v:)")
    parser.add_argument("--by", default="", help="more config keys to split rows by, comma-"
                                                 "separated and dotted (e.g. method.lr)")
    args = parser.parse_args(argv)
    by = tuple(key for key in args.by.split(",") if key)
    columns = tuple(c if c.startswith("v:") or c not in VERDICTS else f"v:{c}"
                    for c in (c.strip() for c in args.columns.split(",")) if c)
    if not args.sweep_dir.is_dir():
        parser.error(f"not a folder: {args.sweep_dir}")
    records, skipped = load_records(args.sweep_dir)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if skipped:
        print(f"{len(skipped)} of {len(records) + len(skipped)} jobs have no finished record",
              file=sys.stderr)
    if not records:
        print(f"no finished records under {args.sweep_dir}", file=sys.stderr)
        return 1
    missing = [key for key in by if all(config_value(r, key) is None for r in records)]
    if missing:
        parser.error(f"--by: no record's config has {', '.join(map(repr, missing))}")
    table = build_table(records, by)
    unknown = [c for c in columns if c not in table.columns and c != "PTQ gap"]
    if unknown:
        parser.error(f"--columns: no column {', '.join(map(repr, unknown))} in this table; "
                     f"columns: {', '.join(c.removeprefix('v:') for c in table.columns)}")
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "table.csv", index=False)
    (out / "table.tex").write_text(table.to_latex(index=False, float_format="%.3f", na_rep="--"))
    print(brief(table) if args.brief else markdown(table, by, columns))
    print(f"\nwrote {out / 'table.csv'} and {out / 'table.tex'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
