"""`vla-accel-merge`: gather the results.jsonl of shards (or whole sweeps) into one table.

    vla-accel-merge multirun/eval/2025-01-01/12-00-00            # a sweep dir: finds every run in it
    vla-accel-merge outputs/shard0 outputs/shard1 --out merged/    # also writes merged results.jsonl/json

Runs are grouped by evaluation (same policy, env, prune, runtime, seed, selection and number of
shards; the shard index, the device and scheduling settings such as eval.num_envs do not matter). For each
group it prints the success and latency tables of a single run, then lists episodes that are
missing (not in any shard's results.jsonl), duplicated (in more than one place) or unexpected.
Exit status: 0 when every group is complete and has no duplicates, 1 otherwise, 2 on bad input
(including an --out dir that holds a run's results: merge never replaces them).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from vla_accel.eval import results as R
from vla_accel.eval.shard import EpisodeKey
from vla_accel.eval.timing import merge_timings


@dataclass
class RunDir:
    path: Path
    info: dict                      # run.json
    summary: dict | None            # results.json, when the run got that far


@dataclass
class MergeReport:
    fingerprint: str
    runs: list[RunDir]
    expected: list[EpisodeKey]
    records: list[dict]                                   # one per episode
    missing: list[EpisodeKey]
    duplicates: dict[EpisodeKey, list[str]]               # episode -> where it was recorded (dirs, repeated)
    unexpected: list[EpisodeKey]
    missing_shards: list[int]
    repeated_shards: dict[int, list[str]]
    summary: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicates or self.unexpected)


def find_runs(paths: Sequence[str | Path]) -> list[RunDir]:
    """Every run dir (one holding run.json) at or below the given paths."""
    runs, seen = [], set()
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        found = [p / R.RUN_FILE] if (p / R.RUN_FILE).exists() else sorted(p.rglob(R.RUN_FILE))
        found = [f for f in found if ".submitit" not in f.parts]
        if not found:
            raise FileNotFoundError(f"no {R.RUN_FILE} at or below {p}: not a vla-accel-eval run or sweep dir")
        for f in found:
            d = f.parent.resolve()
            if d in seen:
                continue
            seen.add(d)
            summary_file = d / R.SUMMARY_FILE
            runs.append(RunDir(d, json.loads(f.read_text()),
                               json.loads(summary_file.read_text()) if summary_file.exists() else None))
    return runs


def merge_group(runs: list[RunDir]) -> MergeReport:
    fields = runs[0].info["fingerprint_fields"]
    expected = [EpisodeKey(*k) for k in fields["selection"]]
    num_shards = int(fields["num_shards"])
    shard_dirs: dict[int, list[str]] = defaultdict(list)
    for run in runs:
        shard_dirs[int(run.info["shard"])].append(str(run.path))

    where: dict[EpisodeKey, list[str]] = defaultdict(list)
    first: dict[EpisodeKey, dict] = {}
    for run in sorted(runs, key=lambda r: (int(r.info["shard"]), str(r.path))):
        latest, dups = R.effective_records(R.read_records(run.path / R.RESULTS_FILE))
        for key in dups:                      # the same episode twice inside one file
            where[key].append(str(run.path))
        for key, record in latest.items():
            where[key].append(str(run.path))
            first.setdefault(key, record)
    wanted = set(expected)
    records = [first[k] for k in sorted(first) if k in wanted]
    report = MergeReport(
        fingerprint=runs[0].info["fingerprint"], runs=runs, expected=expected, records=records,
        missing=sorted(wanted - set(first)),
        duplicates={k: v for k, v in sorted(where.items()) if len(v) > 1},
        unexpected=sorted(set(first) - wanted),
        missing_shards=[s for s in range(num_shards) if s not in shard_dirs],
        repeated_shards={s: d for s, d in sorted(shard_dirs.items()) if len(d) > 1},
    )
    report.summary = {
        "complete": report.ok,
        "runs": [str(r.path) for r in runs],
        "num_shards": num_shards,
        "episodes_total": len(expected),
        "missing": [list(k) for k in report.missing],
        "duplicates": {k.label(): v for k, v in report.duplicates.items()},
        "unexpected": [list(k) for k in report.unexpected],
        "missing_shards": report.missing_shards,
        "policy": next((r.summary["policy"] for r in runs if r.summary), None),
        "random_weights": any(r.summary.get("random_weights") for r in runs if r.summary),
        "devices": sorted({r.summary["device"] for r in runs if r.summary}),
        **R.summarize(records),
        "shard_throughput": [dict(r.summary.get("throughput", {}), shard=r.info["shard"], run=str(r.path))
                             for r in runs if r.summary],
        "timing": merge_timings([r.summary.get("timing") for r in runs if r.summary]),
        "fingerprint": report.fingerprint,
    }
    return report


def merge(paths: Sequence[str | Path]) -> list[MergeReport]:
    groups: dict[str, list[RunDir]] = defaultdict(list)
    for run in find_runs(paths):
        groups[run.info["fingerprint"]].append(run)
    return [merge_group(g) for g in groups.values()]


def _group_label(report: MergeReport, reports: list[MergeReport]) -> str:
    """The settings that set this group apart from the others."""
    if len(reports) == 1:
        return ""
    mine = report.runs[0].info["fingerprint_fields"]
    others = [r.runs[0].info["fingerprint_fields"] for r in reports if r is not report]
    keys = sorted(k for k in mine if k != "selection" and any(o.get(k) != mine[k] for o in others))
    return "; ".join(f"{k}={json.dumps(mine[k], sort_keys=True)}" for k in keys) or "(differs in selection)"


def format_report(report: MergeReport, label: str = "") -> str:
    lines = []
    if label:
        lines.append(f"### {label}")
    n_shards = report.summary["num_shards"]
    lines.append(f"merged {len(report.runs)} run dir(s) of a {n_shards}-shard evaluation: "
                 f"{len(report.records)}/{len(report.expected)} episodes")
    notes = []
    for t in report.summary["shard_throughput"]:
        if t.get("episodes"):
            notes.append(f"shard {t['shard']}: {t['episodes']} episodes in this session, "
                         f"{t['episodes_per_hour']:.1f} episodes/hour with {t.get('num_envs', '?')} env(s)")
    if report.summary["random_weights"]:
        notes.append("NOTE: RANDOM policy weights (smoke test): these success rates mean nothing.")
    devices = ", ".join(report.summary["devices"]) or None
    lines.append(R.format_tables(report.summary, device=devices, notes=notes, timing=report.summary.get("timing")))
    if report.missing_shards:
        lines.append(f"MISSING SHARDS: {report.missing_shards} (no run dir found for them)")
    for shard, dirs in report.repeated_shards.items():
        lines.append(f"SHARD {shard} appears in {len(dirs)} run dirs: {', '.join(dirs)}")
    if report.missing:
        lines.append(f"MISSING: {len(report.missing)} episode(s) in no results.jsonl: "
                     f"{R.describe_keys(report.missing)}")
    if report.duplicates:
        lines.append(f"DUPLICATED: {len(report.duplicates)} episode(s) recorded more than once:")
        for key, dirs in list(report.duplicates.items())[:20]:
            lines.append(f"  {key.label()}: {', '.join(dirs)}")
        if len(report.duplicates) > 20:
            lines.append(f"  ... and {len(report.duplicates) - 20} more")
    if report.unexpected:
        lines.append(f"UNEXPECTED: {len(report.unexpected)} episode(s) outside the selection: "
                     f"{R.describe_keys(report.unexpected)}")
    lines.append("COMPLETE: every selected episode exactly once." if report.ok else "INCOMPLETE (see above).")
    return "\n".join(lines)


def check_out_dir(out: Path) -> str | None:
    """Why the merged results may not be written into `out` (it would replace a run's results), or None."""
    if (out / R.RUN_FILE).exists():
        return (f"--out {out} is a run dir of vla-accel-eval (it has {R.RUN_FILE}); writing there would replace "
                "that run's results. Give a new or empty dir")
    summary = out / R.SUMMARY_FILE
    if (out / R.RESULTS_FILE).exists() or summary.exists():
        try:
            merged_before = "runs" in json.loads(summary.read_text())     # a summary written by this command
        except (OSError, ValueError, TypeError):
            merged_before = False
        if not merged_before:
            return (f"--out {out} already holds {R.RESULTS_FILE} / {R.SUMMARY_FILE} that vla-accel-merge did not "
                    "write; refusing to replace them. Give a new or empty dir")
    return None


def write_merged(report: MergeReport, out: Path) -> None:
    """results.jsonl, results.json and report.png into `out` (checked with check_out_dir), each replaced
    atomically (a failed picture is only a warning)."""
    from vla_accel.eval.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    R.write_atomic(out / R.RESULTS_FILE, "".join(R.record_line(r) for r in report.records))
    R.write_json(out / R.SUMMARY_FILE, report.summary)
    write_report(out / R.REPORT_FILE, report.summary, report.records,
                 title=f"merged: {len(report.runs)} runs, {len(report.records)}/{len(report.expected)} episodes")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vla-accel-merge", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="run dirs and/or sweep dirs of vla-accel-eval")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the merged results.jsonl and results.json here (one evaluation only)")
    args = parser.parse_args(argv)
    try:
        reports = merge(args.dirs)
    except FileNotFoundError as err:
        print(f"vla-accel-merge: error: {err}", file=sys.stderr)
        return 2
    if args.out is not None and len(reports) > 1:
        print(f"vla-accel-merge: error: --out takes one evaluation, but the dirs hold {len(reports)} "
              "different ones (different settings); merge them separately", file=sys.stderr)
        return 2
    problem = check_out_dir(args.out) if args.out is not None else None
    if problem:
        print(f"vla-accel-merge: error: {problem}", file=sys.stderr)
        return 2
    for report in reports:
        print(format_report(report, _group_label(report, reports)))
        print()
    if args.out is not None:
        write_merged(reports[0], args.out)
        print(f"merged results: {args.out / R.RESULTS_FILE}, {args.out / R.SUMMARY_FILE}, {args.out / R.REPORT_FILE}")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
