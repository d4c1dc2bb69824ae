"""Whether two runs computed the same thing: their records (result.json) and per-question outcomes
(predictions.json) compared key by key, ignoring what a rerun elsewhere changes by design.

Ignored: timings, the environment (versions, git commit), where the run wrote (run_dir, output_root,
cache_dir), and `_target_` values that name the same function after a module moved (given as
--moved OLD=NEW prefixes). Numbers must match exactly unless --rtol is given.

Usage: python scripts/compare_records.py RUN_A RUN_B [--moved OLD=NEW ...] [--rtol 0]
  RUN_A, RUN_B: run folders (holding result.json) or sweep folders (their job folders are paired
  by name). Exits 1 and names every differing key when any differ.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

IGNORED_TOP = {"timings", "environment", "run_dir"}
IGNORED_CONFIG = {"output_root", "cache_dir"}


def differences(a, b, *, moved: dict[str, str], rtol: float, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append(f"{where}: only in {'B' if key not in a else 'A'}")
            elif key == "_target_" and isinstance(a[key], str):
                if renamed(a[key], moved) != b[key]:
                    out.append(f"{where}: {a[key]!r} vs {b[key]!r}")
            else:
                out.extend(differences(a[key], b[key], moved=moved, rtol=rtol, path=where))
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b))
                for d in differences(x, y, moved=moved, rtol=rtol, path=f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        same = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=0.0)
        return [] if same else [f"{path}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def renamed(target: str, moved: dict[str, str]) -> str:
    for old, new in sorted(moved.items(), key=lambda kv: -len(kv[0])):
        if target == old or target.startswith(old + "."):
            return new + target[len(old):]
    return target


def comparable(record: dict) -> dict:
    record = {k: v for k, v in record.items() if k not in IGNORED_TOP}
    if isinstance(record.get("config"), dict):
        record["config"] = {k: v for k, v in record["config"].items() if k not in IGNORED_CONFIG}
    return record


def run_pairs(a: Path, b: Path) -> list[tuple[str, Path, Path]]:
    if (a / "result.json").is_file():
        return [(a.name, a, b)]
    jobs = sorted(p.parent.name for p in a.glob("*/result.json"))
    if not jobs:
        raise SystemExit(f"compare_records: no result.json in {a} or its job folders")
    return [(name, a / name, b / name) for name in jobs]


def compare(a: Path, b: Path, *, moved: dict[str, str], rtol: float) -> list[str]:
    found = []
    for name, run_a, run_b in run_pairs(a, b):
        for file in ("result.json", "predictions.json"):
            if not (run_b / file).is_file():
                found.append(f"{name}/{file}: missing in B")
                continue
            left = json.loads((run_a / file).read_text(encoding="utf-8"))
            right = json.loads((run_b / file).read_text(encoding="utf-8"))
            if file == "result.json":
                left, right = comparable(left), comparable(right)
            found += [f"{name}/{file}: {d}" for d in
                      differences(left, right, moved=moved, rtol=rtol)]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--moved", action="append", default=[], metavar="OLD=NEW",
                        help="a module path prefix that moved (for _target_ values)")
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance of numbers")
    args = parser.parse_args(argv)
    moved = {}
    for item in args.moved:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            parser.error(f"--moved expects OLD=NEW, got {item!r}")
        moved[old] = new
    found = compare(args.run_a, args.run_b, moved=moved, rtol=args.rtol)
    jobs = len(run_pairs(args.run_a, args.run_b))
    if found:
        print("\n".join(found))
        print(f"compare_records: {len(found)} differences in {jobs} run(s)")
        return 1
    print(f"compare_records: {jobs} run(s) equal (ignoring timings, environment, paths"
          + (", moved _target_ modules" if moved else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
