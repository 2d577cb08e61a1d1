"""Two runs of the accuracy harness side by side: each row's accuracy, and how the row order moves.

    python eval/compare_runs.py eval/results/accuracy_methods_default.json \
        eval/results/seed1/accuracy_methods_default.json --labels "seed 0" "seed 1" --out seeds_default.md

Rows are matched by (name, kept tokens). At each budget the rows are ranked by accuracy in
each run; the table gives both accuracies, their difference and both ranks, and the summary
per budget the Spearman correlation of the ranks and the largest move of one row. Ties share
the mean of their ranks, so rows within a question of each other do not count as moving.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ranks(values: dict[str, float]) -> dict[str, float]:
    """1 = most accurate; tied rows share the mean of the ranks they span."""
    order = sorted(values, key=lambda k: -values[k])
    ranks: dict[str, float] = {}
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    """Pearson correlation of the two rankings (tie-aware Spearman) over the keys both have."""
    keys = sorted(set(a) & set(b))
    ra, rb = _ranks({k: a[k] for k in keys}), _ranks({k: b[k] for k in keys})
    xa, xb = [ra[k] for k in keys], [rb[k] for k in keys]
    ma, mb = sum(xa) / len(xa), sum(xb) / len(xb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(xa, xb))
    va, vb = sum((x - ma) ** 2 for x in xa), sum((y - mb) ** 2 for y in xb)
    return cov / (va * vb) ** 0.5 if va and vb else 1.0


def compare(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """Per budget: {"rows": [(name, acc_a, acc_b, rank_a, rank_b)], "spearman", "max_move", "mean_abs_diff"}."""
    def table(rows):
        return {(r["name"], r["keep_tokens"]): r["accuracy"] for r in rows}

    ta, tb = table(rows_a), table(rows_b)
    out = {}
    for keep in sorted({k for _, k in ta} & {k for _, k in tb}, reverse=True):
        a = {n: v for (n, k), v in ta.items() if k == keep and (n, k) in tb}
        b = {n: tb[(n, keep)] for n in a}
        ra, rb = _ranks(a), _ranks(b)
        rows = sorted(((n, a[n], b[n], ra[n], rb[n]) for n in a), key=lambda r: r[3])
        out[keep] = {
            "rows": rows,
            "spearman": spearman(a, b),
            "max_move": max(abs(r[3] - r[4]) for r in rows),
            "mean_abs_diff": sum(abs(r[1] - r[2]) for r in rows) / len(rows),
        }
    return out


def to_markdown(result: dict, labels: tuple[str, str]) -> str:
    la, lb = labels
    lines = ["| kept | row | " + f"{la} | {lb} | diff | rank {la} | rank {lb} |", "|---|---|---|---|---|---|---|"]
    for keep, r in result.items():
        for name, a, b, ra, rb in r["rows"]:
            lines.append(f"| {keep} | {name} | {100 * a:.1f} | {100 * b:.1f} | {100 * (b - a):+.1f} | {ra:g} | {rb:g} |")
    lines += ["", "| kept | Spearman of the ranks | largest move (ranks) | mean abs. difference (points) |",
              "|---|---|---|---|"]
    for keep, r in result.items():
        lines.append(f"| {keep} | {r['spearman']:.3f} | {r['max_move']:g} | {100 * r['mean_abs_diff']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", help="an accuracy harness JSON (eval/accuracy.py)")
    p.add_argument("second", help="another one, over the same rows")
    p.add_argument("--labels", nargs=2, default=("first", "second"), help="the two columns' names")
    p.add_argument("--out", default=None, help="write the Markdown here too")
    args = p.parse_args(argv)
    rows = [json.loads(Path(f).read_text())["rows"] for f in (args.first, args.second)]
    md = to_markdown(compare(*rows), tuple(args.labels))
    print(md, end="")
    if args.out:
        Path(args.out).write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
