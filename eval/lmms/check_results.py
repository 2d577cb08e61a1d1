"""Check what an lmms-eval run of ``--model pumer_llava`` on ``pumer_proxy`` wrote.

lmms-eval's CLI exits 0 even when the evaluation raised, so a run only counts when
its files say so. For each ``--run LABEL=DIR`` (DIR = that run's ``--output_path``,
run with ``--log_samples``):

- a ``*_results.json`` exists, with the task's ``exact_match`` and ``--expect`` samples;
- the per-sample log has ``--expect`` lines whose scores average to that accuracy;
- the ``*_pumer_stats.json`` sidecar exists, covers every sample, records no failure,
  and has the expected reduction (``--expect-method``, visual tokens kept);

and across runs and against ``--reference`` (``eval/lmms/reference_score.py``):

- every run gives the same answer to every question (batch size 8 vs 1);
- the accuracy, and which questions are right, equal the project's own scoring.

Exits non-zero with every problem listed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def newest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.rglob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def first_word(text: str) -> str:
    words = text.strip().lower().split()
    return words[0].strip(".,;:!?\"'") if words else ""


def load_run(label: str, folder: Path, task: str, expect: int, problems: list[str]) -> dict | None:
    res_path = newest(folder, "*_results.json")
    if res_path is None:
        problems.append(f"[{label}] no *_results.json under {folder}: the evaluation failed (read its log)")
        return None
    results = json.loads(res_path.read_text())
    metrics = results.get("results", {}).get(task)
    if not metrics or not isinstance(metrics.get("exact_match,none"), (int, float)):
        problems.append(f"[{label}] {res_path} has no exact_match for {task}: {metrics}")
        return None
    acc = float(metrics["exact_match,none"])
    n = results.get("n-samples", {}).get(task, {}).get("effective")
    if n != expect:
        problems.append(f"[{label}] {n} samples evaluated, expected {expect}")
    samples_path = newest(folder, f"*_samples_{task}.jsonl")
    if samples_path is None:
        problems.append(f"[{label}] no per-sample log (*_samples_{task}.jsonl): run lmms-eval with --log_samples")
        return None
    samples = {}
    for line in samples_path.read_text().splitlines():
        s = json.loads(line)
        resp = s["filtered_resps"]
        resp = resp[0] if isinstance(resp, list) else resp
        samples[int(s["doc_id"])] = {"response": resp, "score": float(s["exact_match"]), "target": s["target"]}
    if len(samples) != expect:
        problems.append(f"[{label}] the sample log has {len(samples)} samples, expected {expect}")
    if samples and abs(sum(s["score"] for s in samples.values()) / len(samples) - acc) > 1e-9:
        problems.append(f"[{label}] the sample scores do not average to the reported accuracy {acc}")
    stats_path = newest(folder, "*_pumer_stats.json")
    stats = None
    if stats_path is None:
        problems.append(f"[{label}] no *_pumer_stats.json sidecar next to the results")
    else:
        stats = json.loads(stats_path.read_text())
        if len(stats.get("samples", {})) != expect:
            problems.append(f"[{label}] the stats sidecar covers {len(stats.get('samples', {}))} samples, expected {expect}")
        if stats.get("failures"):
            problems.append(f"[{label}] the stats sidecar records failures: {stats['failures'][:3]}")
    throughput = results.get("throughput", {})
    if "avg_pumer_visual_tokens_final" not in throughput:
        problems.append(f"[{label}] the results JSON lacks the pumer throughput keys: {sorted(throughput)}")
    return {"label": label, "accuracy": acc, "samples": samples, "stats": stats, "results": res_path}


def check_multiple_choice(specs: list[str], task: str, expect: int, min_acc: dict[str, float]) -> int:
    """A multiple-choice run counts when its results give ``acc`` over ``expect`` samples, the
    stats sidecar covers every one (one encoding of each context) with no failure, and the
    accuracy reaches its ``--min-acc``."""
    problems = []
    for spec in specs:
        label, _, folder = spec.partition("=")
        res_path = newest(Path(folder), "*_results.json")
        if res_path is None:
            problems.append(f"[{label}] no *_results.json under {folder}: the evaluation failed (read its log)")
            continue
        results = json.loads(res_path.read_text())
        acc = results.get("results", {}).get(task, {}).get("acc,none")
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        if not isinstance(acc, (int, float)) or n != expect:
            problems.append(f"[{label}] {res_path}: acc {acc!r} over {n} samples, expected {expect}")
            continue
        print(f"[{label}] {task} acc {acc:.4f} on {n} samples ({res_path})")
        if acc < min_acc.get(label, 0.0):
            problems.append(f"[{label}] accuracy {acc} below {min_acc[label]}")
        stats_path = newest(Path(folder), "*_pumer_stats.json")
        stats = json.loads(stats_path.read_text()) if stats_path else {}
        if len(stats.get("samples", {})) != expect or stats.get("failures"):
            problems.append(f"[{label}] the stats sidecar covers {len(stats.get('samples', {}))} of {expect} samples, "
                            f"failures: {stats.get('failures', [])[:3]}")
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("lmms-eval multiple-choice checks passed")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--multiple-choice", metavar="TASK", help="check multiple-choice runs of TASK (acc) instead")
    p.add_argument("--min-acc", action="append", default=[], help="LABEL=X: that run's accuracy must reach X")
    p.add_argument("--run", action="append", required=True, help="LABEL=DIR, DIR = the run's --output_path")
    p.add_argument("--task", default="pumer_proxy")
    p.add_argument("--expect", type=int, required=True, help="number of samples each run evaluated (--limit)")
    p.add_argument("--reference", help="JSON from eval/lmms/reference_score.py on the same samples")
    p.add_argument("--expect-method", default=None, help="reduction method the sidecar must record (none = unreduced)")
    p.add_argument("--expect-keep", type=float, default=None, help="mean fraction of visual tokens kept, e.g. 0.25")
    a = p.parse_args(argv)
    if a.multiple_choice:
        min_acc = {k: float(v) for k, _, v in (x.partition("=") for x in a.min_acc)}
        return check_multiple_choice(a.run, a.multiple_choice, a.expect, min_acc)

    problems: list[str] = []
    runs = []
    for spec in a.run:
        label, _, folder = spec.partition("=")
        run = load_run(label, Path(folder), a.task, a.expect, problems)
        if run is not None:
            runs.append(run)
            print(f"[{label}] exact_match {run['accuracy']:.4f} on {len(run['samples'])} samples ({run['results']})")

    for run in runs:
        stats = run["stats"]
        if stats is None:
            continue
        method = (stats.get("reduction") or {}).get("method")
        if a.expect_method is not None and method != a.expect_method:
            problems.append(f"[{run['label']}] the sidecar records method {method!r}, expected {a.expect_method!r}")
        keep = stats.get("summary", {}).get("pumer_visual_keep_ratio")
        if a.expect_keep is not None and (keep is None or abs(keep - a.expect_keep) > 0.02):
            problems.append(f"[{run['label']}] mean visual tokens kept {keep}, expected about {a.expect_keep}")

    base = runs[0] if runs else None
    for run in runs[1:]:
        diff = [d for d in base["samples"] if run["samples"].get(d, {}).get("response") != base["samples"][d]["response"]]
        if diff:
            d = diff[0]
            problems.append(
                f"[{run['label']}] answers differ from [{base['label']}] on {len(diff)} samples, e.g. doc {d}: "
                f"{run['samples'].get(d, {}).get('response')!r} vs {base['samples'][d]['response']!r}"
            )
        else:
            print(f"[{run['label']}] same answers as [{base['label']}] on all {len(base['samples'])} samples")

    if a.reference and runs:
        ref = json.loads(Path(a.reference).read_text())
        print(f"[reference] accuracy {ref['accuracy']:.4f} on {len(ref['correct'])} samples (project scoring)")
        if len(ref["correct"]) != a.expect:
            problems.append(f"[reference] scored {len(ref['correct'])} samples, expected {a.expect}")
        for run in runs:
            if abs(run["accuracy"] - ref["accuracy"]) > 1e-9:
                problems.append(f"[{run['label']}] accuracy {run['accuracy']} != project scoring {ref['accuracy']}")
            for i, (ok, pred, ans) in enumerate(zip(ref["correct"], ref["predictions"], ref["answers"])):
                s = run["samples"].get(i)
                if s is None:
                    continue
                if s["target"] != ans:
                    problems.append(f"[{run['label']}] doc {i}: target {s['target']!r} but the reference's answer is {ans!r}")
                    break
                if bool(s["score"]) != bool(ok) or first_word(s["response"]) != pred.lower():
                    problems.append(
                        f"[{run['label']}] doc {i}: lmms-eval answered {s['response']!r} (score {s['score']}), "
                        f"the project's scoring predicts {pred!r} (correct={ok})"
                    )
                    break

    if problems:
        print("FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("lmms-eval checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
