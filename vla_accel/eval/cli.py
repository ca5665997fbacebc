"""`vla-accel-eval`: OpenVLA-OFT on LIBERO, N simulators in parallel, results on disk per episode.

    vla-accel-eval                                   # tiny policy with RANDOM weights, 1 task, 1 episode
    vla-accel-eval policy=checkpoint policy.checkpoint=moojink/openvla-7b-oft-finetuned-libero-spatial \
        eval=full eval.suites=[libero_spatial] eval.num_envs=4
    vla-accel-eval ... hydra.run.dir=outputs/eval/spatial      # same dir again = resume
    vla-accel-eval --multirun eval.num_shards=4 eval.shard=0,1,2,3 hydra/launcher=local_gpus ...

Config groups (vla_accel/configs): policy, env, eval, prune, runtime, hydra/launcher.
Writes into the run dir: run.json, results.jsonl (one line per finished episode), results.json,
summary.txt, videos/ (eval.video=true). Full guide: docs/evaluation.md.

Exit status (a single run): 0 every episode recorded, none with an error; 2 configuration or input
error (one message, nothing ran); 3 stopped early by errors (results.json says why and names the
episodes not run); 4 ran to the end, but episodes are recorded with an error or missing; 130
interrupted (Ctrl-C); 1 an unexpected internal error (a bug: traceback).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vla_accel.eval import results as R
from vla_accel.eval.config import ConfigError, RunConfig, describe_changes, fingerprint, run_config_from_hydra
from vla_accel.eval.shard import EpisodeKey, build_selection, shard_selection

log = logging.getLogger("vla_accel.eval")

EXIT_OK = 0              # every episode of the shard recorded, none with an error
EXIT_INTERNAL = 1        # an unexpected exception (a bug); the traceback is printed
EXIT_CONFIG = 2          # configuration or input error: one message, no traceback, nothing ran
EXIT_STOPPED = 3         # stopped early: errors in a row, policy faults, simulator workers, results not writable
EXIT_INCOMPLETE = 4      # ran to the end, but episodes are recorded with an error or missing
EXIT_INTERRUPTED = 130   # Ctrl-C (SIGINT)

RANDOM_WEIGHTS_NOTE = ("NOTE: the policy has RANDOM weights (policy=random_tiny or random_7b, no download): the "
                       "success rates of this run say nothing about OpenVLA-OFT. For real numbers: policy=checkpoint "
                       "policy.checkpoint=<dir or hub id> eval=full")


def pin_gpu(enabled: bool, job_num: int | None) -> str | None:
    """Under submitit_local with several visible GPUs, job k keeps only GPU (k mod #GPUs).

    submitit's local executor gives every job the same CUDA_VISIBLE_DEVICES (0..gpus_per_node-1);
    this narrows it per job before CUDA is initialised. SLURM assigns GPUs itself (no-op there).
    """
    if not enabled or job_num is None or os.environ.get("SUBMITIT_EXECUTOR") != "local":
        return None
    ids = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(ids) < 2:
        return None
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[job_num % len(ids)]
    if os.environ["CUDA_VISIBLE_DEVICES"].isdigit():   # the simulators' EGL device too (robosuite reads it)
        os.environ["MUJOCO_EGL_DEVICE_ID"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return os.environ["CUDA_VISIBLE_DEVICES"]


def egl_device_for_workers() -> None:
    """robosuite picks its EGL device from CUDA_VISIBLE_DEVICES and crashes on an empty value,
    which submitit_local sets for jobs without GPUs. MUJOCO_EGL_DEVICE_ID takes precedence
    there; 0 is what robosuite uses when CUDA_VISIBLE_DEVICES is unset. Inherited by workers."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" and not os.environ.get("MUJOCO_EGL_DEVICE_ID"):
        os.environ["MUJOCO_EGL_DEVICE_ID"] = "0"


def render_env(render_threads: int | None) -> dict[str, str]:
    """Environment of the simulator workers: eval.render_threads -> LP_NUM_THREADS (threads of
    Mesa's llvmpipe, the CPU EGL renderer; GPU EGL ignores it). null leaves Mesa's default (one
    thread per core). On the 2-core machine it made no measurable difference for 2 simulators
    (199 vs 200 ms per step with 1 or 2 threads each); it is there for many simulators on many cores.
    """
    return {} if render_threads is None else {"LP_NUM_THREADS": str(render_threads)}


def _check_run_dir(run_dir: Path, info: dict, resume: bool) -> None:
    """A run dir holds one evaluation: refuse to mix results of different settings, or to write where
    nothing can be written."""
    old = run_dir / R.RUN_FILE
    if old.exists():
        import json

        prev = json.loads(old.read_text())
        if prev.get("fingerprint") != info["fingerprint"]:
            changes = describe_changes(prev.get("fingerprint_fields", {}), info["fingerprint_fields"])
            raise ConfigError(f"{run_dir} holds results of a different evaluation; changed (run dir -> now):\n  "
                              + "\n  ".join(changes or ["(unknown: the run dir's run.json has no fields)"])
                              + "\nUse another hydra.run.dir, or the same settings to resume.")
        if prev.get("shard") != info["shard"]:
            raise ConfigError(f"{run_dir} holds eval.shard={prev.get('shard')}, not eval.shard={info['shard']}; "
                              "use another hydra.run.dir")
    if not resume and R.read_records(run_dir / R.RESULTS_FILE):
        raise ConfigError(f"{run_dir / R.RESULTS_FILE} already has episodes and eval.resume=false would run "
                          "them again; use a new hydra.run.dir or eval.resume=true")
    problem = unwritable(run_dir)
    if problem:
        raise ConfigError(problem)


def unwritable(path: Path) -> str | None:
    """Why nothing can be written at `path` (a dir, created if missing), or None."""
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write into {path} ({existing} is not a writable directory); use another hydra.run.dir"
    for name in (R.RESULTS_FILE, R.RUN_FILE, R.SUMMARY_FILE):
        f = path / name
        if f.exists() and not os.access(f, os.W_OK):
            return f"cannot write {f} (read-only); use another hydra.run.dir or make it writable"
    return None


def _bars(enabled: bool, selection: list[EpisodeKey], done: set[EpisodeKey], records: list[dict]):
    """Progress bars: tasks done, episodes done with the running success rate."""
    from tqdm import tqdm

    tasks: dict[tuple[str, int], int] = {}
    for k in selection:
        tasks[(k.suite, k.task_id)] = tasks.get((k.suite, k.task_id), 0) + 1
    left = {t: n - sum(1 for k in done if (k.suite, k.task_id) == t) for t, n in tasks.items()}
    disable = None if enabled else True      # None: tqdm stays quiet where stderr is no terminal (logs)
    task_bar = tqdm(total=len(tasks), initial=sum(1 for n in left.values() if n <= 0), desc="tasks   ",
                    position=0, disable=disable, dynamic_ncols=True)
    ep_bar = tqdm(total=len(selection), initial=len(done), desc="episodes", position=1,
                  disable=disable, dynamic_ncols=True)
    tally = {"n": len(records), "ok": sum(int(bool(r.get("success")) and not r.get("error")) for r in records),
             "err": sum(int(bool(r.get("error"))) for r in records)}

    def update(record: dict) -> None:
        tally["n"] += 1
        tally["ok"] += int(bool(record["success"]) and not record.get("error"))
        tally["err"] += int(bool(record.get("error")))
        ep_bar.set_postfix(success=f"{100.0 * tally['ok'] / tally['n']:.1f}%", errors=tally["err"], refresh=False)
        ep_bar.update(1)
        t = (record["suite"], record["task_id"])
        left[t] -= 1
        if left[t] == 0:
            task_bar.update(1)

    def close() -> None:
        ep_bar.close()
        task_bar.close()

    if tally["n"]:
        ep_bar.set_postfix(success=f"{100.0 * tally['ok'] / tally['n']:.1f}%", errors=tally["err"])
    return update, close


def run_eval(cfg: DictConfig) -> dict:
    """The evaluation behind `vla-accel-eval`; returns the summary written to results.json, whose
    `exit_status` is the process's exit status. Configuration and input errors raise ConfigError."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    rc: RunConfig = run_config_from_hydra(cfg)
    ev = rc.eval
    pinned = pin_gpu(ev.pin_gpu_by_job, hc.job.num if multirun else None)
    egl_device_for_workers()

    # 1. what to run (bad suite / task / episode fails here, listing the valid values)
    from vla_accel.eval import factory as F

    catalog = F.LiberoCatalog()
    selection = build_selection(ev.suites, ev.task_ids, ev.episodes, ev.num_episodes,
                                valid_suites=catalog.suites, num_tasks=catalog.num_tasks,
                                num_init_states=catalog.num_init_states)
    mine = shard_selection(selection, ev.shard, ev.num_shards)
    # 2. assets (a missing folder fails naming env.assets_path and the env variable)
    assets = F.resolve_assets(rc)
    # 3. the run dir: the same evaluation (identity without device or scheduling), writable
    unnorm_key = ev.suites[0] if len(ev.suites) == 1 else None
    # a remote policy is connected first (cheap): the run's identity is the server's policy
    actor = F.build_actor(rc, unnorm_key=unnorm_key) if rc.policy.name == "remote" else None
    fields = rc.fingerprint_fields(selection, F.policy_identity(rc.policy, unnorm_key, actor))
    info = {"fingerprint": fingerprint(fields), "fingerprint_fields": fields, "shard": ev.shard,
            "num_shards": ev.num_shards, "episodes_in_shard": len(mine), "episodes_total": len(selection),
            "config": OmegaConf.to_container(cfg, resolve=True)}
    _check_run_dir(run_dir, info, ev.resume)
    previous = R.read_records(run_dir / R.RESULTS_FILE)
    done = R.done_keys(previous, ev.retry_errors) & set(mine)
    todo = [k for k in mine if k not in done]

    # 4. the policy and what it needs (tokenizer, prompt length), before any simulator starts
    num_envs = min(ev.num_envs, max(1, len(todo)))
    if actor is None:
        actor = F.build_actor(rc, unnorm_key=unnorm_key, graph_batch_sizes=range(1, num_envs + 1))
    F.check_prompts(actor, [catalog.instruction(s, t) for s, t in dict.fromkeys((k.suite, k.task_id) for k in todo)])
    desc = dict(actor.describe())
    device = desc.get("device_name") or F.device_name(str(desc.get("device", "cpu")))  # device_name: remote policy
    try:
        R.write_json(run_dir / R.RUN_FILE, info)      # only now: a failed policy load leaves the dir reusable
        writer = R.ResultsWriter(run_dir / R.RESULTS_FILE)
    except OSError as err:
        raise ConfigError(f"cannot write into the run dir {run_dir}: {err.strerror or err}; use another "
                          "hydra.run.dir") from None
    log.info("run dir: %s", run_dir)
    log.info("policy: %s on %s%s", {k: desc[k] for k in list(desc)[:8]}, device,
             f" (CUDA_VISIBLE_DEVICES={pinned})" if pinned else "")
    if desc.get("random_weights"):
        log.warning(RANDOM_WEIGHTS_NOTE)
    log.info("episodes: %d selected, shard %d/%d has %d, %d already done, %d to run on %d env(s)",
             len(selection), ev.shard, ev.num_shards, len(mine), len(done), len(todo), num_envs)

    # 5. rollouts
    from vla_accel.eval.runner import RolloutRunner, RunStats, RunStopped

    task_names = {(k.suite, k.task_id): catalog.task_name(k.suite, k.task_id) for k in mine}
    update, close_bars = _bars(ev.progress, mine, done, [r for r in previous if R.key_of(r) in done])
    stats, interrupted, stopped = RunStats(), False, None

    def on_episode(record: dict) -> None:
        writer.append(record)
        update(record)
        if record.get("error"):
            log.warning("%s/task%d/ep%d failed with an error:\n%s", record["suite"], record["task_id"],
                        record["episode"], record["error"])

    runner = None
    precapture = None
    if todo and ev.precapture_steps:
        from functools import partial

        from vla_accel.eval.precapture import precapture as run_precapture

        precapture = partial(run_precapture, actor, batch_sizes=range(1, num_envs + 1),
                             instructions=[catalog.instruction(k.suite, k.task_id) for k in todo[:num_envs]],
                             image_size=rc.env.image_size, steps=ev.precapture_steps)
    cuda = str(desc.get("device", "")).startswith("cuda")
    try:
        if todo:
            runner = RolloutRunner(
                actor, F.env_factory(rc, assets), num_envs=ev.num_envs, on_episode=on_episode,
                task_names=task_names, seed=ev.seed, warmup_chunks=ev.warmup_chunks,
                video_dir=run_dir / "videos" if ev.video else None, video_fps=ev.video_fps,
                trace_path=ev.record_trace, step_timeout_s=ev.step_timeout_s, context=ev.worker_context,
                record_fields={"shard": ev.shard, "num_shards": ev.num_shards},
                max_consecutive_errors=ev.max_consecutive_errors,
                worker_env=render_env(ev.render_threads), precapture=precapture,
                gpu_device=str(desc["device"]) if cuda and ev.gpu_sample_s > 0 else None,
                gpu_interval_s=ev.gpu_sample_s or 0.5, prepare_in_workers=ev.prepare_in_workers)
            runner.run(todo)
    except KeyboardInterrupt:
        interrupted = True
    except (RunStopped, R.ResultsWriteError) as err:
        stopped = str(err)
    finally:
        writer.close()
        close_bars()
        stats = runner.stats if runner is not None else stats
        summary = write_summary(run_dir, mine, info, desc, device, stats, num_envs, interrupted, stopped)
        if ev.report:
            from vla_accel.eval.report import write_report

            latest, _ = R.effective_records(R.read_records(run_dir / R.RESULTS_FILE))
            write_report(run_dir / R.REPORT_FILE, summary, [latest[k] for k in mine if k in latest])
    _report(summary, run_dir)
    return summary


def exit_status(summary: dict) -> int:
    if summary["interrupted"]:
        return EXIT_INTERRUPTED
    if summary["stopped"]:
        return EXIT_STOPPED
    return EXIT_OK if summary["complete"] else EXIT_INCOMPLETE


def _report(summary: dict, run_dir: Path) -> None:
    """The closing message for each non-zero exit status: what happened, what to do."""
    status = summary["exit_status"]
    again = f"run the same command with hydra.run.dir={run_dir}"
    if status == EXIT_INTERRUPTED:
        log.warning("interrupted: %d episode(s) are in %s; %s to resume",
                    summary["success"]["average"]["episodes"], run_dir / R.RESULTS_FILE, again)
    elif status == EXIT_STOPPED:
        log.error("stopped: %s\n%d episode(s) not run. Fix the cause, then %s eval.retry_errors=true to run "
                  "them and redo the failed ones.", summary["stopped"], len(summary["missing"]), again)
    elif status == EXIT_INCOMPLETE:
        log.error("not clean: %d episode(s) recorded with an error, %d missing (results.json: errors, missing); "
                  "%s eval.retry_errors=true to run them again.", len(summary["errors"]), len(summary["missing"]),
                  again)


def _previous_summary(run_dir: Path) -> dict:
    import json

    try:
        previous = json.loads((run_dir / R.SUMMARY_FILE).read_text())
        return previous if isinstance(previous, dict) else {}
    except (OSError, ValueError):
        return {}


def _timing(run_dir: Path, stats) -> dict | None:
    """Where the time went in this session; a session that ran no episode keeps the previous one's figures."""
    if stats.episodes or stats.wall_s > 0:
        return stats.timing_summary()
    return _previous_summary(run_dir).get("timing")


def _throughput(run_dir: Path, stats, num_envs: int) -> dict:
    """Rollout throughput over every session of this run dir that ran episodes (a re-run that had
    nothing left to do keeps the figures)."""
    sessions = (_previous_summary(run_dir).get("throughput") or {}).get("sessions", [])
    if stats.episodes:
        sessions = sessions + [{"episodes": stats.episodes, "wall_s": round(stats.wall_s, 3), "num_envs": num_envs,
                                "worker_restarts": stats.worker_restarts}]
    episodes = sum(s["episodes"] for s in sessions)
    wall_s = sum(s["wall_s"] for s in sessions)
    return {"episodes": episodes, "wall_s": wall_s,
            "episodes_per_hour": 3600.0 * episodes / wall_s if wall_s > 0 else 0.0,
            "num_envs": sessions[-1]["num_envs"] if sessions else num_envs,
            "worker_restarts": sum(s["worker_restarts"] for s in sessions), "sessions": sessions}


def write_summary(run_dir: Path, mine: list[EpisodeKey], info: dict, desc: dict, device: str, stats,
                  num_envs: int, interrupted: bool, stopped: str | None = None) -> dict:
    """results.json + summary.txt from everything in results.jsonl for this shard; prints the tables.

    On a full disk the summary files keep their previous version (atomic writes) and the returned
    summary's `stopped` says so."""
    latest, duplicates = R.effective_records(R.read_records(run_dir / R.RESULTS_FILE))
    wanted = set(mine)
    records = [latest[k] for k in sorted(latest) if k in wanted]
    missing = sorted(wanted - set(latest))
    errors = [{"episode": R.key_of(r).label(), "error": (r["error"].strip().splitlines() or [""])[-1]}
              for r in records if r.get("error")]
    throughput = _throughput(run_dir, stats, num_envs)
    timing = _timing(run_dir, stats)
    summary = {
        "complete": not missing and not errors,    # every episode recorded, none with an error
        "interrupted": interrupted,
        "stopped": stopped,
        "shard": info["shard"], "num_shards": info["num_shards"],
        "episodes_in_shard": len(mine), "episodes_total": info["episodes_total"],
        "missing": [list(k) for k in missing],
        "duplicates": [list(k) for k in duplicates],
        "errors": errors,
        "policy": desc, "random_weights": bool(desc.get("random_weights")), "device": device,
        **R.summarize(records),
        "throughput": throughput,
        "timing": timing,
        "fingerprint": info["fingerprint"],
    }
    notes = []
    if missing:
        notes.append(f"not done: {len(missing)} episode(s): {R.describe_keys(missing, 8)}")
    if errors:
        notes.append(f"recorded with an error: {len(errors)} episode(s): "
                     f"{R.describe_keys([R.key_of(r) for r in records if r.get('error')], 8)}")
    if summary["random_weights"]:
        notes.append(RANDOM_WEIGHTS_NOTE)
    notes.append(f"results: {run_dir / R.RESULTS_FILE} ({len(records)} episodes), summary: {run_dir / R.SUMMARY_FILE}")
    table = R.format_tables(summary, device=device, throughput=throughput, notes=notes, timing=timing)
    summary["exit_status"] = exit_status(summary)
    try:
        R.write_json(run_dir / R.SUMMARY_FILE, summary)
        R.write_atomic(run_dir / R.TABLE_FILE, table + "\n")
    except OSError as err:            # a full disk: the previous results.json, if any, stays as it was
        note = f"{run_dir / R.SUMMARY_FILE} not updated: {err.strerror or err}"
        summary["stopped"] = f"{stopped}\n({note})" if stopped else note
        summary["exit_status"] = exit_status(summary)
    print(table, flush=True)
    return summary


class _Exit(SystemExit):
    """An exit status decided here (Hydra's own failures exit through a plain SystemExit(1))."""


@hydra.main(version_base="1.3", config_path="pkg://vla_accel.configs", config_name="evaluate")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        status = run_eval(cfg)["exit_status"]
    except ConfigError as err:
        print(f"vla-accel-eval: error: {err}", file=sys.stderr, flush=True)
        raise _Exit(EXIT_CONFIG) from None
    except KeyboardInterrupt:
        print("vla-accel-eval: interrupted before any episode ran", file=sys.stderr, flush=True)
        raise _Exit(EXIT_INTERRUPTED) from None
    except Exception:
        log.exception("internal error (a bug; please report it with this traceback)")
        raise _Exit(EXIT_INTERNAL) from None
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if status and not (multirun and status == EXIT_INCOMPLETE):   # a sweep goes on past episode errors
        raise _Exit(status)


def _output_dir_problem(argv: list[str]) -> str | None:
    """A run / sweep dir given on the command line that cannot be written (checked before Hydra,
    which would fail with a traceback opening its log file there)."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    given = [a[len(key):].strip("'\"") for a in argv if a.startswith(key)]
    return unwritable(Path(given[-1])) if given and "$" not in given[-1] else None


def main() -> None:
    """Console entry point; exit statuses as in the module doc."""
    argv = sys.argv[1:]
    problem = _output_dir_problem(argv)
    if problem:
        print(f"vla-accel-eval: error: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CONFIG)
    try:
        _hydra_main()
    except _Exit:
        raise
    except SystemExit as exc:
        # Hydra's own failures (unknown config option, bad override, ...) are input errors; it printed
        # why. In a --multirun, 1 may also mean that a job failed: left as it is.
        if exc.code == 1 and not any(a in ("-m", "--multirun") for a in argv):
            raise SystemExit(EXIT_CONFIG) from None
        raise


if __name__ == "__main__":
    main()
