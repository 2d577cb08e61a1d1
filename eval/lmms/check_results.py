"""Check what an lmms-eval run of ``--model pumer_llava`` on ``pumer_proxy`` wrote.

lmms-eval's CLI exits 0 even when the evaluation raised, so a run only counts when
its files say so. For each ``--run LABEL=DIR`` (DIR = that run's ``--output_path``,
run with ``--log_samples``):

- a ``*_results.json`` exists, with the task's ``exact_match`` and ``--expect`` samples;
- the per-sample log has ``--expect`` lines whose scores average to that accuracy;
- the ``*_pumer_stats.json`` sidecar exists, covers every sample, records no failure,
  and has the expected reduction (``--expect-method``, visual tokens kept); for a run
  on N processes (``--processes LABEL=N``) the N per-rank files add up to it;

and across runs and against ``--reference`` (``eval/lmms/reference_score.py``):

- every run gives the same answer to every question (batch size 8 vs 1, one process
  vs two);
- the accuracy, and which questions are right, equal the project's own scoring.

``--multiple-choice TASK`` checks ``acc`` runs the same way: per-choice losses from the
sample log, the same choices and losses in every run, and with ``--reference`` the
project's full-forward scoring of every choice.

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


def read_run(label: str, folder: Path, task: str, metric: str, expect: int, problems: list[str]):
    """A run's results JSON and per-sample log (``--log_samples``), checked alike for every task
    type: ``metric`` over ``expect`` samples, the log's per-sample scores averaging to it.
    Returns (results path, results, value, per-sample records), or None when a file is missing."""
    res_path = newest(folder, "*_results.json")
    if res_path is None:
        problems.append(f"[{label}] no *_results.json under {folder}: the evaluation failed (read its log)")
        return None
    results = json.loads(res_path.read_text())
    value = results.get("results", {}).get(task, {}).get(f"{metric},none")
    if not isinstance(value, (int, float)):
        problems.append(f"[{label}] {res_path} has no {metric} for {task}: {results.get('results', {}).get(task)}")
        return None
    n = results.get("n-samples", {}).get(task, {}).get("effective")
    if n != expect:
        problems.append(f"[{label}] {n} samples evaluated, expected {expect}")
    samples_path = newest(folder, f"*_samples_{task}.jsonl")
    if samples_path is None:
        problems.append(f"[{label}] no per-sample log (*_samples_{task}.jsonl): run lmms-eval with --log_samples")
        return None
    records = [json.loads(line) for line in samples_path.read_text().splitlines()]
    if len(records) != expect:
        problems.append(f"[{label}] the sample log has {len(records)} samples, expected {expect}")
    if records and abs(sum(float(r[metric]) for r in records) / len(records) - value) > 1e-9:
        problems.append(f"[{label}] the sample scores do not average to the reported {metric} {value}")
    return res_path, results, float(value), records


def load_run(label: str, folder: Path, task: str, expect: int, processes: int, problems: list[str]) -> dict | None:
    run = read_run(label, folder, task, "exact_match", expect, problems)
    if run is None:
        return None
    res_path, results, acc, records = run
    samples = {}
    for s in records:
        resp = s["filtered_resps"]
        resp = resp[0] if isinstance(resp, list) else resp
        samples[int(s["doc_id"])] = {"response": resp, "score": float(s["exact_match"]), "target": s["target"]}
    stats = check_sidecar(label, folder, expect, processes, problems)
    throughput = results.get("throughput", {})
    if "avg_pumer_visual_tokens_final" not in throughput:
        problems.append(f"[{label}] the results JSON lacks the pumer throughput keys: {sorted(throughput)}")
    return {"label": label, "accuracy": acc, "samples": samples, "stats": stats, "results": res_path}


def check_sidecar(label: str, folder: Path, expect: int, processes: int, problems: list[str]) -> dict | None:
    """The merged ``*_pumer_stats.json`` covers every sample with no failure; with ``processes``
    > 1 there is one ``*_rank<r>.json`` per rank and together they hold exactly those samples."""
    stats_path = newest(folder, "*_pumer_stats.json")
    if stats_path is None:
        problems.append(f"[{label}] no *_pumer_stats.json sidecar next to the results")
        return None
    stats = json.loads(stats_path.read_text())
    samples = set(stats.get("samples", {}))
    if len(samples) != expect:
        problems.append(f"[{label}] the stats sidecar covers {len(samples)} samples, expected {expect}")
    if stats.get("failures"):
        problems.append(f"[{label}] the stats sidecar records failures: {stats['failures'][:3]}")
    ranks = sorted(stats_path.parent.glob(f"{stats_path.stem}_rank*.json"))
    if processes > 1:
        if len(ranks) != processes:
            problems.append(f"[{label}] {len(ranks)} per-rank stats files next to {stats_path.name}, expected {processes}")
        per_rank = [set(json.loads(r.read_text()).get("samples", {})) for r in ranks]
        union = set().union(*per_rank) if per_rank else set()
        if union != samples or any(len(r) == 0 for r in per_rank):
            problems.append(f"[{label}] the per-rank stats ({[len(r) for r in per_rank]} samples) do not add up "
                            f"to the merged file's {len(samples)}")
        else:
            print(f"[{label}] stats merged from {len(ranks)} ranks ({[len(r) for r in per_rank]} samples each)")
    elif ranks:
        problems.append(f"[{label}] per-rank stats files in a single-process run: {[r.name for r in ranks]}")
    return stats


def load_multiple_choice(label: str, folder: Path, task: str, expect: int, processes: int,
                         problems: list[str]) -> dict | None:
    run = read_run(label, folder, task, "acc", expect, problems)
    if run is None:
        return None
    res_path, _, acc, records = run
    docs = {}
    for s in records:
        losses = [float(r[0]) for r in (x[0] if isinstance(x[0], list) else x for x in s["filtered_resps"])]
        docs[int(s["doc_id"])] = {"losses": losses, "chosen": min(range(len(losses)), key=losses.__getitem__),
                                  "target": int(s["target"]), "acc": float(s["acc"]), "question": s.get("input")}
    wrong = [i for i, d in docs.items() if (d["chosen"] == d["target"]) != bool(d["acc"])]
    if wrong:
        problems.append(f"[{label}] lmms-eval's score is not 'the lowest loss is the target' on docs {wrong[:5]}")
    check_sidecar(label, folder, expect, processes, problems)
    print(f"[{label}] {task} acc {acc:.4f} on {len(docs)} samples ({res_path})")
    return {"label": label, "accuracy": acc, "docs": docs}


def check_multiple_choice(specs: list[str], task: str, expect: int, processes: dict[str, int],
                          reference: str | None, tol: float) -> int:
    """Multiple-choice runs (``acc``): each complete (results, sample log, sidecar), every run
    choosing what the first one chooses with the same losses (within ``tol``), and with
    ``reference`` (``reference_score.py --multiple-choice``) the project's own scoring."""
    problems: list[str] = []
    runs = []
    for spec in specs:
        label, _, folder = spec.partition("=")
        run = load_multiple_choice(label, Path(folder), task, expect, processes.get(label, 1), problems)
        if run is not None:
            runs.append(run)

    def compare(run, docs, name):
        bad = [i for i, d in run["docs"].items() if i in docs and (
            d["chosen"] != docs[i]["chosen"] or max(abs(x - y) for x, y in zip(d["losses"], docs[i]["losses"])) > tol)]
        missing = sorted(set(docs) - set(run["docs"]))
        if bad or missing:
            i = (bad or missing)[0]
            problems.append(f"[{run['label']}] differs from {name} on {len(bad)} docs (missing {len(missing)}), "
                            f"e.g. doc {i}: {run['docs'].get(i, {}).get('losses')} vs {docs[i]['losses']}")
        else:
            print(f"[{run['label']}] same choices and losses (within {tol}) as {name} on all {len(docs)} docs")

    for run in runs[1:]:
        compare(run, runs[0]["docs"], f"[{runs[0]['label']}]")
    if reference and runs:
        ref = json.loads(Path(reference).read_text())
        print(f"[reference] accuracy {ref['accuracy']:.4f} on {len(ref['chosen'])} questions (project scoring)")
        if len(ref["chosen"]) != expect:
            problems.append(f"[reference] scored {len(ref['chosen'])} questions, expected {expect}")
        docs = {i: {"losses": l, "chosen": c} for i, (l, c) in enumerate(zip(ref["losses"], ref["chosen"]))}
        for run in runs:
            q = [i for i, d in run["docs"].items() if i < len(ref["questions"]) and d["question"] not in (None, ref["questions"][i])]
            if q:
                problems.append(f"[{run['label']}] doc {q[0]} is not the reference's question {q[0]}")
            if abs(run["accuracy"] - ref["accuracy"]) > 1e-9:
                problems.append(f"[{run['label']}] accuracy {run['accuracy']} != project scoring {ref['accuracy']}")
            compare(run, docs, "the project's scoring")
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("lmms-eval multiple-choice checks passed")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--multiple-choice", metavar="TASK", help="check multiple-choice runs of TASK (acc) instead")
    p.add_argument("--processes", action="append", default=[],
                   help="LABEL=N: that run was launched on N processes (one stats file per rank, merged)")
    p.add_argument("--tol", type=float, default=1e-3, help="multiple choice: largest loss difference between runs")
    p.add_argument("--run", action="append", required=True, help="LABEL=DIR, DIR = the run's --output_path")
    p.add_argument("--task", default="pumer_proxy")
    p.add_argument("--expect", type=int, required=True, help="number of samples each run evaluated (--limit)")
    p.add_argument("--reference", help="JSON from eval/lmms/reference_score.py on the same samples")
    p.add_argument("--expect-method", default=None, help="reduction method the sidecar must record (none = unreduced)")
    p.add_argument("--expect-keep", type=float, default=None, help="mean fraction of visual tokens kept, e.g. 0.25")
    a = p.parse_args(argv)
    processes = {k: int(v) for k, _, v in (x.partition("=") for x in a.processes)}
    if a.multiple_choice:
        return check_multiple_choice(a.run, a.multiple_choice, a.expect, processes, a.reference, a.tol)

    problems: list[str] = []
    runs = []
    for spec in a.run:
        label, _, folder = spec.partition("=")
        run = load_run(label, Path(folder), a.task, a.expect, processes.get(label, 1), problems)
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
