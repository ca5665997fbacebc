"""`vla-accel-demos`: scripted-expert demonstrations in LIBERO, and the expert's success rate.

    vla-accel-demos --out /work/data/demos --suite libero_object --tasks 0-9 --episodes 0-19 --workers 4
    vla-accel-demos --out /work/data/expert_check --episodes 0-49 --state-only   # success rate only, no cameras

Each attempted episode (official init state `episode` of a task) is one line of
`<out>/manifest.jsonl` (success, steps, regrasps, seconds); each successful one with cameras is one
`.npz` under `<out>/<suite>/` (format: vla_accel.train.data). Episodes already in the manifest are
skipped, so the same command resumes. The episode protocol is LiberoEnv's (the OpenVLA-OFT eval:
init state, 10 settle steps, the suite's max steps, success = LIBERO's done); the recorded
observations are exactly what LiberoEnv gives a policy (both cameras upright at --image-size, 8-D
state), the actions the ones executed. `--state-only` runs the same episodes without cameras
(about 30x faster on CPU) to measure the expert.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from vla_accel.train.data import CAMERAS, Episode, encode_jpeg, episode_path, save_episode

MANIFEST = "manifest.jsonl"


def record_episode(env, task_id: int, episode: int, *, cameras: bool = True,
                   expert_cfg=None) -> tuple[dict, Episode | None]:
    """Runs the expert on one episode of `env` (a LiberoEnv); -> (manifest record, Episode or None)."""
    from vla_accel.envs.expert import ExpertConfig, PickPlaceExpert, libero_scene

    t0 = time.perf_counter()
    obs, info = env.reset(options={"task_id": task_id, "episode": episode})
    expert = PickPlaceExpert(expert_cfg or ExpertConfig())
    states, actions, jpegs = [], [], {c: [] for c in CAMERAS}
    terminated = truncated = False
    while not (terminated or truncated):
        action = expert.act(libero_scene(env))
        states.append(obs["state"])
        if cameras:
            for c in CAMERAS:
                jpegs[c].append(encode_jpeg(obs[c]))
        actions.append(action)
        obs, _, terminated, truncated, info = env.step(action)
    record = {"suite": env.suite, "task_id": task_id, "episode": episode, "success": bool(terminated),
              "steps": len(actions), "regrasps": expert.regrasps, "final_phase": expert.phase.value,
              "seconds": round(time.perf_counter() - t0, 2)}
    if not cameras:
        return record, None
    meta = {**record, "instruction": info["instruction"], "image_size": env.image_size,
            "phases": [(step, phase.value) for step, phase in expert.transitions]}
    return record, Episode(meta=meta, state=np.stack(states), action=np.stack(actions).astype(np.float32), jpegs=jpegs)


def _worker(args: tuple) -> list[dict]:
    """Runs a list of (task_id, episode) jobs in one process; writes episode files as it goes."""
    out, suite, jobs, image_size, state_only, assets_path = args
    from vla_accel.envs import LiberoEnv
    from vla_accel.envs.expert import StateOnlyLiberoEnv

    env = (StateOnlyLiberoEnv(suite, jobs[0][0], assets_path=assets_path) if state_only else
           LiberoEnv(suite, jobs[0][0], image_size=image_size, assets_path=assets_path))
    records = []
    try:
        for task_id, episode in jobs:
            try:
                record, ep = record_episode(env, task_id, episode, cameras=not state_only)
            except Exception as err:  # noqa: BLE001 - one broken episode is recorded, the others go on
                record, ep = {"suite": suite, "task_id": task_id, "episode": episode, "success": False,
                              "error": f"{type(err).__name__}: {err}"}, None
                env.close()
            if ep is not None and record["success"]:
                record["file"] = str(save_episode(episode_path(out, suite, task_id, episode), ep).relative_to(out))
            _append(Path(out) / MANIFEST, record)
            print(json.dumps(record), flush=True)
            records.append(record)
    finally:
        env.close()
    return records


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:  # one short line per write: concurrent appends from workers stay whole
        f.write(json.dumps(record) + "\n")


def read_manifest(out: str | os.PathLike) -> list[dict]:
    path = Path(out) / MANIFEST
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def success_table(records: list[dict]) -> str:
    """Per-task expert success (latest record per episode) as a markdown table."""
    latest = {(r["suite"], r["task_id"], r["episode"]): r for r in records}
    tasks = sorted({k[:2] for k in latest})
    lines = ["| suite | task | episodes | success | rate | median steps (successes) |", "|---|---|---|---|---|---|"]
    total = ok_total = 0
    for suite, task in tasks:
        rs = [r for k, r in latest.items() if k[:2] == (suite, task)]
        ok = [r for r in rs if r["success"]]
        steps = f"{np.median([r['steps'] for r in ok]):.0f}" if ok else "-"
        lines.append(f"| {suite} | {task} | {len(rs)} | {len(ok)} | {100 * len(ok) / len(rs):.1f}% | {steps} |")
        total, ok_total = total + len(rs), ok_total + len(ok)
    if total:
        lines.append(f"| all | | {total} | {ok_total} | {100 * ok_total / total:.1f}% | |")
    return "\n".join(lines)


def parse_range(text: str) -> list[int]:
    """'0-9' / '0,3,5' / '0-4,8' -> sorted unique ints."""
    values: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-")
                values.update(range(int(lo), int(hi) + 1))
            elif part:
                values.add(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected indices like 0-9 or 0,3,5; got {text!r}") from None
    return sorted(values)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="vla-accel-demos", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (manifest.jsonl + <suite>/task*_ep*.npz)")
    ap.add_argument("--suite", default="libero_object", help="LIBERO suite (default libero_object)")
    ap.add_argument("--tasks", type=parse_range, default=parse_range("0-9"), help="task ids, e.g. 0-9 or 0,3")
    ap.add_argument("--episodes", type=parse_range, default=parse_range("0-19"),
                    help="official init-state indices, e.g. 0-19")
    ap.add_argument("--workers", type=int, default=1, help="simulators in parallel (one process each)")
    ap.add_argument("--image-size", type=int, default=256, help="camera side in pixels (the OFT eval: 256)")
    ap.add_argument("--state-only", action="store_true", help="no cameras: measure the expert, write no demos")
    ap.add_argument("--assets-path", default=None, help="LIBERO asset folder (default: $VLA_ACCEL_LIBERO_ASSETS)")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error(f"--workers must be >= 1, got {args.workers}")
    from vla_accel.envs import resolve_assets_path, validate_selection

    try:
        validate_selection(args.suite, args.tasks, args.episodes)
        assets = str(resolve_assets_path(args.assets_path))
    except (ValueError, FileNotFoundError) as err:
        ap.error(str(err))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = {(r["task_id"], r["episode"]) for r in read_manifest(out) if r["suite"] == args.suite and "error" not in r}
    # demos: episode-major, so that any prefix of a run covers every task about equally;
    # --state-only: task-major (a task switch rebuilds the simulator)
    jobs = [(t, e) for e in args.episodes for t in args.tasks if (t, e) not in done]
    if args.state_only:
        jobs.sort()
    print(f"vla-accel-demos: {len(jobs)} episode(s) to run ({len(done)} already in {out / MANIFEST}), "
          f"{args.workers} worker(s)", flush=True)
    if jobs:
        if args.workers == 1:
            slices = [jobs]
        else:  # contiguous task-major blocks: a worker switches task (= rebuilds its simulator) rarely
            jobs.sort()
            bounds = np.linspace(0, len(jobs), args.workers + 1).round().astype(int)
            slices = [jobs[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        work = [(str(out), args.suite, s, args.image_size, args.state_only, assets) for s in slices]
        if len(work) == 1:
            _worker(work[0])
        else:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(len(work)) as pool:  # EGL contexts do not survive fork
                pool.map(_worker, work)
    table = success_table([r for r in read_manifest(out) if r["suite"] == args.suite])
    (out / "expert_success.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
