"""report.png: one picture of a run (or a merged evaluation) for a person to look at.

    write_report(run_dir / "report.png", summary, records)    # never raises: a failure is logged as a warning

Four panels: success per task; the per-chunk policy latency distribution (after warm-up, without chunks whose
forward captured graphs); where the rollout's wall time went (summary["timing"]); tokens entering each backbone
layer when pruning (the actor's `kept_per_layer`, mean and 10-90% band), else the unpruned token count.
matplotlib is imported here only (its Agg canvas, no global backend change).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)


def _latencies(records: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(chunk latency ms, batch size) of every timed chunk: not warm-up, no graph capture."""
    ms, batch = [], []
    for r in records:
        n = len(r.get("chunk_ms") or [])
        warm = r.get("chunk_warmup") or [False] * n
        capture = r.get("chunk_capture_ms") or [0.0] * n
        bs = r.get("chunk_batch") or [1] * n
        for i in range(n):
            if not warm[i] and not capture[i]:
                ms.append(float(r["chunk_ms"][i]))
                batch.append(int(bs[i] or 1))
    return np.asarray(ms), np.asarray(batch)


def _tokens_per_layer(records: Sequence[dict]) -> np.ndarray | None:
    """[chunks, layers] tokens entering each layer (SpecPrune's kept_per_layer; warm-up chunks too: this is no
    timing), or None without pruning."""
    rows = []
    for r in records:
        rows.extend(p for p in (r.get("chunk_extra") or {}).get("kept_per_layer") or [] if p)
    lengths = {len(p) for p in rows}
    return np.asarray(rows, dtype=np.float64) if rows and len(lengths) == 1 else None


def _message(ax, text: str, title: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _success_panel(ax, summary: dict) -> None:
    tasks = summary["success"]["per_task"]
    if not tasks:
        _message(ax, "no episodes", "success per task")
        return
    labels = [f"{t['suite'].replace('libero_', '')}/{t['task_id']}" for t in tasks]
    rates = [100.0 * (t["success_rate"] or 0.0) for t in tasks]
    y = np.arange(len(tasks))
    ax.barh(y, rates, color="tab:green")
    for k, t in enumerate(tasks):
        ax.text(min(rates[k] + 1, 90), k, f"{t['successes']}/{t['episodes']}" + (f" ({t['errors']} err)" if
                t["errors"] else ""), va="center", fontsize=7)
    ax.set_yticks(y, labels, fontsize=7 if len(tasks) <= 20 else 5)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("success %")
    avg = summary["success"]["average"]["mean_over_suites"]
    title = "success per task" + (f" (mean over suites {100 * avg:.1f}%)" if avg is not None else "")
    if summary.get("random_weights"):
        title += "\nRANDOM WEIGHTS: success means nothing"
    ax.set_title(title, fontsize=9)


def _latency_panel(ax, summary: dict, records: Sequence[dict]) -> None:
    ms, batch = _latencies(records)
    lat = summary.get("latency", {})
    if ms.size == 0:
        _message(ax, f"no timed chunks ({lat.get('warmup_chunks_excluded', 0)} warm-up, "
                     f"{lat.get('capture_chunks_excluded', 0)} with graph captures)", "policy latency per chunk")
        return
    sizes = sorted(set(batch.tolist()))
    data = [ms[batch == b] for b in sizes] if len(sizes) <= 6 else [ms]
    labels = [f"B={b} (n={int((batch == b).sum())})" for b in sizes] if len(sizes) <= 6 else [f"all (n={ms.size})"]
    ax.hist(data, bins=40, stacked=True, label=labels)
    med, p90 = float(np.median(ms)), float(np.percentile(ms, 90))
    ax.axvline(med, color="k", lw=1)
    ax.axvline(p90, color="k", lw=1, ls="--")
    ax.set_xlabel("ms per batched policy call (median solid, p90 dashed)")
    ax.set_ylabel("chunks")
    ax.legend(fontsize=7)
    excluded = f"{lat.get('warmup_chunks_excluded', 0)} warm-up, {lat.get('capture_chunks_excluded', 0)} capture"
    ax.set_title(f"policy latency per chunk: median {med:.1f} ms, p90 {p90:.1f} ms\n(excluded: {excluded})",
                 fontsize=9)


def _time_panel(ax, summary: dict) -> None:
    timing = summary.get("timing") or {}
    parts = {k: v for k, v in (timing.get("parts_s") or {}).items() if abs(v) >= 1e-3}
    wall = timing.get("wall_s") or 0.0
    if not parts or wall <= 0:
        _message(ax, "no timing (no episode ran)", "where the time went")
        return
    names = list(parts)
    values = [parts[n] for n in names]
    y = np.arange(len(names))
    ax.barh(y, values, color=["tab:blue" if n.startswith(("sim", "render", "reset")) else
                              "tab:orange" if n.startswith(("policy", "graph")) else "tab:gray" for n in names])
    for k, v in enumerate(values):
        ax.text(max(v, 0), k, f" {v:.1f} s ({100 * v / wall:.0f}%)", va="center", fontsize=7)
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (main process)")
    eph = timing.get("episodes_per_hour")
    gpu = timing.get("gpu") or {}
    sub = f"{wall:.0f} s, {eph:.0f} episodes/hour" if eph else f"{wall:.0f} s"
    if gpu.get("sampled"):
        sub += f", GPU util mean {gpu['util_mean']:.0f}%"
    ax.set_title(f"where the time went ({sub})", fontsize=9)


def _tokens_panel(ax, summary: dict, records: Sequence[dict]) -> None:
    tokens = _tokens_per_layer(records)
    if tokens is None:
        kept = summary.get("latency", {}).get("mean_tokens_kept")
        _message(ax, "no pruning" + (f": {kept:.0f} tokens in every layer" if kept else ""), "tokens per layer")
        return
    layers = np.arange(tokens.shape[1])
    mean = tokens.mean(0)
    ax.fill_between(layers, np.percentile(tokens, 10, axis=0), np.percentile(tokens, 90, axis=0), alpha=0.3,
                    label="10-90%")
    ax.plot(layers, mean, marker=".", label="mean")
    ax.set_xlabel("backbone layer")
    ax.set_ylabel("tokens entering the layer")
    ax.set_ylim(0, None)
    ax.legend(fontsize=7)
    ax.set_title(f"tokens kept per layer ({tokens.shape[0]} chunks; first {mean[0]:.0f}, last {mean[-1]:.0f})",
                 fontsize=9)


def render_report(path: str | os.PathLike, summary: dict, records: Sequence[dict], title: str = "") -> Path:
    """Draws the four panels into `path` (PNG, replaced atomically). Raises what matplotlib raises."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 9), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    _success_panel(axes[0, 0], summary)
    _latency_panel(axes[0, 1], summary, records)
    _time_panel(axes[1, 0], summary)
    _tokens_panel(axes[1, 1], summary, records)
    policy = summary.get("policy") or {}
    device = summary.get("device") or ", ".join(summary.get("devices") or [])
    head = title or (f"{policy.get('source') or policy.get('name', '')} | executor {policy.get('executor', '?')} | "
                     f"prune {policy.get('prune', 'none')} | {device}")
    fig.suptitle(head, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_report(path: str | os.PathLike, summary: dict, records: Sequence[dict], title: str = "") -> Path | None:
    """render_report, or a logged warning when plotting fails (the run's results are not affected)."""
    try:
        out = render_report(path, summary, records, title)
    except Exception as exc:  # noqa: BLE001 - a picture must never fail a run
        log.warning("report.png not written (%s: %s); the results are unaffected", type(exc).__name__, exc)
        return None
    log.info("report: %s", out)
    return out
