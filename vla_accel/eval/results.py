"""Episode records (results.jsonl), the run summary (results.json) and the printed tables.

One JSON line per finished episode, appended, flushed and fsynced as it finishes:
  suite, task_id, task, instruction, episode, success, steps, wall_s, error,
  chunk_ms        per-chunk latency measured around act_batch (ms; one value per chunk of the episode)
  chunk_model_ms  the actor's own latency_ms for that chunk (model forward), or null
  chunk_batch     batch size of the forward that produced the chunk
  chunk_warmup    true for chunks produced by the process's first `eval.warmup_chunks` forwards
  chunk_actions   actions executed from the chunk
  chunk_capture_ms  CUDA-graph capture time inside that forward (0: none); such chunks are left out of the latency
  tokens_kept     tokens kept by pruning per chunk (null without pruning)
  chunk_extra     other keys the actor reported, one list per key
  shard, num_shards, seed, slot, video, trace (paths or null), finished_at
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from vla_accel.eval import faults
from vla_accel.eval.shard import EpisodeKey

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "results.json"
RUN_FILE = "run.json"
TABLE_FILE = "summary.txt"
REPORT_FILE = "report.png"


def key_of(record: dict) -> EpisodeKey:
    return EpisodeKey(str(record["suite"]), int(record["task_id"]), int(record["episode"]))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def record_line(record: dict) -> str:
    """One results.jsonl line (with its newline)."""
    return json.dumps(record, default=_json_default) + "\n"


class ResultsWriteError(RuntimeError):
    """results.jsonl could not be written (disk full, read-only, ...); what was written before is intact."""

    def __init__(self, message: str, errno: int | None):
        super().__init__(message)
        self.errno = errno


class ResultsWriter:
    """Appends one record per line; each line is on disk (fsync) before append() returns.

    A failed append (a full disk) cuts the file back to where the line began, so the file holds
    only whole records, and raises ResultsWriteError with one message that says what to do.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"   # a line cut by a crash: start a fresh line
        self._file = open(self.path, "ab", buffering=0)
        self.appended = 0
        if needs_newline:
            self._write(b"\n")

    def append(self, record: dict) -> None:
        self._write(record_line(record).encode("utf-8"))
        self.appended += 1

    def _write(self, data: bytes) -> None:
        start = os.fstat(self._file.fileno()).st_size
        try:
            faults.write(self._file, data)
            os.fsync(self._file.fileno())
        except OSError as err:
            try:
                os.ftruncate(self._file.fileno(), start)
            except OSError:
                pass
            raise ResultsWriteError(
                f"cannot write {self.path}: {err.strerror or err}. The episodes recorded before are intact "
                f"({self.appended} in this session); free space or fix the permissions, then run the same "
                "command again to resume", err.errno) from err

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_records(path: str | os.PathLike) -> list[dict]:
    """Records of a results.jsonl; unreadable lines (e.g. cut by a crash) are skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
                key_of(record)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("%s:%d is not a valid episode record; ignoring it (the episode will count "
                            "as not done)", path, lineno)
                continue
            records.append(record)
    return records


def effective_records(records: Iterable[dict]) -> tuple[dict[EpisodeKey, dict], list[EpisodeKey]]:
    """One record per episode, and the episodes recorded more than once.

    A record with an error may be superseded by a later one (eval.retry_errors); any other
    repetition of an episode is a duplicate (the first record is kept).
    """
    latest: dict[EpisodeKey, dict] = {}
    duplicates: list[EpisodeKey] = []
    for record in records:
        key = key_of(record)
        previous = latest.get(key)
        if previous is None or previous.get("error"):
            latest[key] = record
        else:
            duplicates.append(key)
    return latest, duplicates


def done_keys(records: Iterable[dict], retry_errors: bool) -> set[EpisodeKey]:
    """Episodes a resumed run skips."""
    latest, _ = effective_records(records)
    return {k for k, r in latest.items() if not (retry_errors and r.get("error"))}


# ----------------------------------------------------------------------------------------------
# Aggregation


def _rate(successes: int, episodes: int) -> float | None:
    return successes / episodes if episodes else None


def success_summary(records: Sequence[dict]) -> dict:
    """Per task, per suite and average success; errors count as failures (and are counted)."""
    per_task: dict[tuple[str, int], dict] = {}
    for r in records:
        row = per_task.setdefault((r["suite"], int(r["task_id"])), {
            "suite": r["suite"], "task_id": int(r["task_id"]), "task": r.get("task") or "",
            "episodes": 0, "successes": 0, "errors": 0})
        row["episodes"] += 1
        row["successes"] += int(bool(r.get("success")) and not r.get("error"))
        row["errors"] += int(bool(r.get("error")))
    tasks = [per_task[k] for k in sorted(per_task)]
    for row in tasks:
        row["success_rate"] = _rate(row["successes"], row["episodes"])
    suites: dict[str, dict] = {}
    for row in tasks:
        s = suites.setdefault(row["suite"], {"episodes": 0, "successes": 0, "errors": 0, "tasks": 0})
        s["episodes"] += row["episodes"]
        s["successes"] += row["successes"]
        s["errors"] += row["errors"]
        s["tasks"] += 1
    for s in suites.values():
        s["success_rate"] = _rate(s["successes"], s["episodes"])
    episodes = sum(s["episodes"] for s in suites.values())
    successes = sum(s["successes"] for s in suites.values())
    rates = [s["success_rate"] for s in suites.values() if s["success_rate"] is not None]
    return {
        "per_task": tasks,
        "per_suite": suites,
        "average": {
            "mean_over_suites": float(np.mean(rates)) if rates else None,   # the paper's "average"
            "pooled": _rate(successes, episodes),
            "episodes": episodes,
            "successes": successes,
            "errors": sum(s["errors"] for s in suites.values()),
        },
    }


def latency_summary(records: Sequence[dict]) -> dict:
    """Per-chunk latency after warm-up, without chunks whose forward captured graphs, and policy throughput.

    Each chunk counts once (a batched forward that served B streams produced B chunks, each with
    that forward's latency). Policy time counts each forward once (sum of latency / batch size).
    """
    ms, model_ms, batch, actions, tokens = [], [], [], [], []
    warmup = captured = 0
    for r in records:
        n = len(r.get("chunk_ms") or [])
        warm = r.get("chunk_warmup") or [False] * n
        capture = r.get("chunk_capture_ms") or [0.0] * n
        mms = r.get("chunk_model_ms") or [None] * n
        bs = r.get("chunk_batch") or [1] * n
        acts = r.get("chunk_actions") or []
        tk = r.get("tokens_kept") or [None] * n
        actions.extend(a for a in acts if a)
        for i in range(n):
            if warm[i]:
                warmup += 1
                continue
            if capture[i]:
                captured += 1
                continue
            ms.append(float(r["chunk_ms"][i]))
            batch.append(int(bs[i] or 1))
            if mms[i] is not None:
                model_ms.append(float(mms[i]))
            if tk[i] is not None:
                tokens.append(float(tk[i]))
    out: dict[str, Any] = {"chunks": len(ms), "warmup_chunks_excluded": warmup, "capture_chunks_excluded": captured}
    if not ms:
        return out
    arr = np.asarray(ms)
    policy_time_s = float(sum(m / b for m, b in zip(ms, batch)) / 1000.0)
    chunk_size = max(actions) if actions else None
    chunks_per_s = len(ms) / policy_time_s if policy_time_s > 0 else math.nan
    out.update({
        "median_ms": float(np.median(arr)),
        "p90_ms": float(np.percentile(arr, 90)),
        "mean_ms": float(arr.mean()),
        "min_ms": float(arr.min()),
        "max_ms": float(arr.max()),
        "mean_batch": float(np.mean(batch)),
        "policy_time_s": policy_time_s,
        "chunks_per_s": chunks_per_s,
        "actions_per_chunk": chunk_size,
        "actions_per_s": chunks_per_s * chunk_size if chunk_size else None,
    })
    if model_ms:
        out["model_median_ms"] = float(np.median(model_ms))
        out["model_p90_ms"] = float(np.percentile(model_ms, 90))
    if tokens:
        out["mean_tokens_kept"] = float(np.mean(tokens))
    return out


def summarize(records: Sequence[dict]) -> dict:
    return {"success": success_summary(records), "latency": latency_summary(records)}


# ----------------------------------------------------------------------------------------------
# Printing


def _pct(rate: float | None) -> str:
    return "   n/a" if rate is None else f"{100.0 * rate:5.1f}%"


def format_tables(summary: dict, *, device: str | None = None, throughput: dict | None = None,
                  notes: Sequence[str] = (), timing: dict | None = None) -> str:
    success, lat = summary["success"], summary["latency"]
    lines = []
    width = 78
    lines.append("=" * width)
    lines.append(f"{'suite':<16}{'task':>5}  {'name':<37}{'episodes':>9}{'success':>9}")
    lines.append("-" * width)
    for row in success["per_task"]:
        name = row["task"] if len(row["task"]) <= 36 else row["task"][:33] + "..."
        err = f"  ({row['errors']} errors)" if row["errors"] else ""
        lines.append(f"{row['suite']:<16}{row['task_id']:>5}  {name:<37}{row['episodes']:>9}"
                     f"{_pct(row['success_rate']):>9}{err}")
    lines.append("-" * width)
    for suite, s in success["per_suite"].items():
        err = f"  ({s['errors']} errors)" if s["errors"] else ""
        lines.append(f"{suite:<16}{'all':>5}  {str(s['tasks']) + ' tasks':<37}{s['episodes']:>9}"
                     f"{_pct(s['success_rate']):>9}{err}")
    avg = success["average"]
    lines.append(f"{'average':<16}{'':>5}  {'mean over suites':<37}{avg['episodes']:>9}"
                 f"{_pct(avg['mean_over_suites']):>9}")
    lines.append("=" * width)
    captured = lat.get("capture_chunks_excluded", 0)
    if lat.get("chunks"):
        lines.append(f"policy latency per chunk (without {lat['warmup_chunks_excluded']} warm-up chunks"
                     f"{f' and {captured} chunks whose forward captured graphs' if captured else ''}, "
                     f"n={lat['chunks']}): median {lat['median_ms']:.1f} ms, p90 {lat['p90_ms']:.1f} ms, "
                     f"mean {lat['mean_ms']:.1f} ms")
        if "model_median_ms" in lat:
            lines.append(f"  model forward as reported by the actor: median {lat['model_median_ms']:.1f} ms, "
                         f"p90 {lat['model_p90_ms']:.1f} ms")
        aps = f"{lat['actions_per_s']:.1f}" if lat.get("actions_per_s") else "n/a"
        lines.append(f"policy throughput: {lat['chunks_per_s']:.2f} chunks/s, {aps} actions/s "
                     f"(mean batch {lat['mean_batch']:.2f}, {lat['actions_per_chunk']} actions/chunk)")
        if "mean_tokens_kept" in lat:
            lines.append(f"tokens kept per chunk: mean {lat['mean_tokens_kept']:.1f}")
    else:
        lines.append(f"policy latency: no chunks after warm-up ({lat['warmup_chunks_excluded']} warm-up "
                     f"chunks and {captured} with graph captures excluded; lower eval.warmup_chunks for short runs)")
    if device:
        lines.append(f"device: {device}")
    if throughput and throughput.get("episodes"):
        lines.append(f"rollouts: {throughput['episodes']} episodes in {throughput['wall_s']:.1f} s "
                     f"= {throughput['episodes_per_hour']:.1f} episodes/hour "
                     f"with {throughput.get('num_envs', '?')} env(s)")
    if timing:
        from vla_accel.eval.timing import format_timing

        lines.extend(format_timing(timing))
    lines.extend(notes)
    return "\n".join(lines)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace `path` by `text` atomically (temp file + fsync + rename): a crash or a full disk leaves
    the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def describe_keys(keys: Sequence[EpisodeKey], limit: int = 20) -> str:
    """Short human list of episodes: 'libero_spatial/task0/ep3, ... (and 12 more)'."""
    keys = sorted(keys)
    text = ", ".join(k.label() for k in keys[:limit])
    if len(keys) > limit:
        text += f", ... (and {len(keys) - limit} more)"
    return text
