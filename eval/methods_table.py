"""One table of every method: proxy accuracy (default layers and layer 0), FLOPs, prefill
speed-up and KV cache on the scaled preset, from the JSON files the harness writes.

Usage (the three runs it reads are in docs/accuracy.md and docs/benchmarks.md)::

    python eval/methods_table.py \\
        --default eval/results/accuracy_methods_default.json \\
        --layer0 eval/results/accuracy_methods_layer0.json \\
        --speed eval/results/speed_cpu_llava-1.5-7b-scaled_fp32_methods.json \\
        --out eval/results/methods_table

Writes ``<out>.md``, ``<out>.json`` and ``<out>.png`` (accuracy against prefill speed-up).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CONTROLS = ("random", "oracle_aware", "oracle_blind", "lowest", "feature_norm")


def accuracy_by(rows: list[dict]) -> dict[str, dict[int, dict]]:
    """name -> kept tokens -> row (the unreduced row under every budget)."""
    out: dict[str, dict[int, dict]] = {}
    for r in rows:
        out.setdefault(r["name"], {})[r["keep_tokens"]] = r
    return out


def build(default: dict, layer0: dict, speed: dict | None) -> dict:
    acc_d, acc_0 = accuracy_by(default["rows"]), accuracy_by(layer0["rows"])
    budgets = sorted({r["keep_tokens"] for r in default["rows"] if r["name"] != "unreduced"}, reverse=True)
    summary = (speed or {}).get("summary", {})
    fractions = sorted({float(f) for m in summary.values() for f in m if float(f) < 1.0}, reverse=True)
    visual = (speed or {}).get("config", {}).get("visual_tokens", 576)
    names = [n for n in acc_d if n != "unreduced"]
    rows = []
    for name in names:
        row = {"method": name, "control": name in CONTROLS or name.startswith("oracle"),
               "default": {k: acc_d[name][k]["accuracy"] for k in budgets if k in acc_d[name]},
               "layers_default": next(iter(acc_d[name].values()))["layers"],
               "layer0": {k: acc_0.get(name, {}).get(k, {}).get("accuracy") for k in budgets},
               "flops_ratio": {k: acc_d[name][k]["flops_ratio"] for k in budgets if k in acc_d[name]}}
        sp = summary.get(name, {})
        row["speed"] = {round(float(f) * visual): {"prefill_speedup": sp[f]["prefill_speedup"],
                                                   "flops_speedup": sp[f]["flops_speedup"],
                                                   "kv_ratio": sp[f]["kv_ratio"],
                                                   "prefill_ops_ratio": sp[f].get("prefill_ops_ratio")}
                        for f in sp if float(f) < 1.0}
        rows.append(row)
    return {"budgets": budgets, "unreduced": acc_d["unreduced"][max(acc_d["unreduced"])]["accuracy"],
            "visual_tokens": visual, "speed_budgets": [round(f * visual) for f in fractions], "rows": rows}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def to_markdown(t: dict) -> str:
    b = t["budgets"]
    sb = t["speed_budgets"]
    head = (["method", "layers"] + [f"acc {k}/64" for k in b] + [f"acc {k}/64, layer 0" for k in b]
            + [f"FLOPs {b[-1]}/64"] + [f"prefill x {k}/{t['visual_tokens']}" for k in sb]
            + ([f"KV {sb[-1]}/{t['visual_tokens']}", f"prefill ops {sb[-1]}/{t['visual_tokens']}"] if sb else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(t["rows"], key=lambda r: (r["control"], -(r["default"].get(b[-1]) or 0)))
    for r in order:
        layers = ",".join(str(x) for x in r["layers_default"]) or "before the LLM"
        cells = [f"{r['method']}{' (control)' if r['control'] else ''}", layers]
        cells += [_pct(r["default"].get(k)) for k in b] + [_pct(r["layer0"].get(k)) for k in b]
        cells += [f"{r['flops_ratio'].get(b[-1], float('nan')):.2f}"]
        cells += [f"{r['speed'][k]['prefill_speedup']:.2f}" if k in r["speed"] else "-" for k in sb]
        if sb:
            last = r["speed"].get(sb[-1], {})
            cells += [f"{last['kv_ratio']:.2f}" if last else "-"]
            cells += [f"{last['prefill_ops_ratio']:.2f}" if last.get("prefill_ops_ratio") is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Unreduced proxy accuracy {_pct(t['unreduced'])}%. Accuracy on the proxy LLaVA's test split "
                 "(64 visual tokens); \"layer 0\": every in-LLM method at layer 0, or at layer 1 where it scores the "
                 "layer before (fastv, dart, sparsevlm); before-LLM methods are the same in both. Prefill speed-up, "
                 "KV cache and prefill operators dispatched (reduced / unreduced) on the CPU scaled preset.")
    return "\n".join(lines) + "\n"


def plot(t: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = t["budgets"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in ((axes[0], "default", "default layers"), (axes[1], "layer0", "layer 0 (in-LLM methods)")):
        for i, r in enumerate(sorted(t["rows"], key=lambda r: r["method"])):
            ys = [r[key].get(k) for k in b]
            ax.plot(b, [100 * y if y is not None else float("nan") for y in ys], marker="o",
                    linestyle="--" if r["control"] else "-", color=f"C{i % 10}", label=r["method"])
        ax.axhline(100 * t["unreduced"], color="k", linewidth=0.8)
        ax.set_xlabel("visual tokens kept (of 64)")
        ax.set_title(title)
        ax.invert_xaxis()
    axes[0].set_ylabel("proxy accuracy %")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--default", required=True, help="eval/accuracy.py JSON at the methods' default layers")
    p.add_argument("--layer0", required=True, help="eval/accuracy.py JSON with --method-layers 0")
    p.add_argument("--speed", default=None, help="pumer-bench JSON on the scaled preset")
    p.add_argument("--out", default="eval/results/methods_table")
    a = p.parse_args(argv)
    speed = json.loads(Path(a.speed).read_text()) if a.speed else None
    t = build(json.loads(Path(a.default).read_text()), json.loads(Path(a.layer0).read_text()), speed)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(t, indent=1))
    out.with_suffix(".md").write_text(to_markdown(t))
    plot(t, out.with_suffix(".png"))
    print(to_markdown(t))
    return t


if __name__ == "__main__":
    main()
