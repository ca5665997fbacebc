"""results.jsonl writing/reading, resume bookkeeping, success and latency aggregation, typed config."""

import json

import pytest
from omegaconf import OmegaConf

from vla_accel.eval import results as R
from vla_accel.eval.config import ConfigError, run_config_from_hydra
from vla_accel.eval.shard import EpisodeKey


def rec(suite="libero_spatial", task=0, ep=0, success=True, error=None, **kw):
    base = {"suite": suite, "task_id": task, "task": f"task {task}", "episode": ep, "success": success,
            "steps": 10, "wall_s": 1.0, "error": error}
    base.update(kw)
    return base


def test_writer_appends_lines_and_reader_skips_a_cut_line(tmp_path):
    path = tmp_path / "results.jsonl"
    with R.ResultsWriter(path) as w:
        w.append(rec(ep=0))
        w.append(rec(ep=1))
    with open(path, "a") as f:            # a crash in the middle of a line
        f.write('{"suite": "libero_spatial", "task_id": 0, "epi')
    assert [r["episode"] for r in R.read_records(path)] == [0, 1]
    with R.ResultsWriter(path) as w:      # the next run starts on a fresh line
        w.append(rec(ep=2))
    assert [r["episode"] for r in R.read_records(path)] == [0, 1, 2]
    assert R.read_records(tmp_path / "absent.jsonl") == []


def test_a_full_disk_cuts_the_unfinished_line_and_says_so(tmp_path, monkeypatch):
    from vla_accel.eval import faults

    monkeypatch.setenv(faults.ENV_VAR, '{"disk_full_after": 1}')
    faults._spec.cache_clear()
    monkeypatch.setitem(faults._appends, "n", 0)
    path = tmp_path / "results.jsonl"
    with R.ResultsWriter(path) as w:
        w.append(rec(ep=0))
        with pytest.raises(R.ResultsWriteError, match="No space left on device. The episodes recorded before are "
                                                      r"intact \(1 in this session\)") as err:
            w.append(rec(ep=1))               # half of the line reaches the disk, then ENOSPC
    faults._spec.cache_clear()
    assert err.value.errno == 28
    assert [r["episode"] for r in R.read_records(path)] == [0] and path.read_text().endswith("}\n")


def test_done_keys_and_retry_of_errored_episodes():
    records = [rec(ep=0), rec(ep=1, success=False, error="boom"), rec(ep=2, success=False)]
    def k(e):
        return EpisodeKey("libero_spatial", 0, e)

    assert R.done_keys(records, retry_errors=False) == {k(0), k(1), k(2)}
    assert R.done_keys(records, retry_errors=True) == {k(0), k(2)}
    # a retried episode supersedes its error record; it is not a duplicate
    latest, dups = R.effective_records(records + [rec(ep=1, success=True)])
    assert latest[k(1)]["success"] is True and dups == []
    latest, dups = R.effective_records(records + [rec(ep=0, success=False)])
    assert latest[k(0)]["success"] is True and dups == [k(0)]


def test_success_summary_per_task_suite_and_average():
    records = ([rec(task=0, ep=e, success=e < 3) for e in range(4)]           # 3/4
               + [rec(task=1, ep=e, success=False) for e in range(2)]          # 0/2
               + [rec(task=1, ep=2, success=True, error="sim died")]           # error = failure
               + [rec(suite="libero_goal", task=5, ep=e, success=True) for e in range(2)])  # 2/2
    s = R.success_summary(records)
    tasks = {(t["suite"], t["task_id"]): t for t in s["per_task"]}
    assert tasks[("libero_spatial", 0)]["success_rate"] == 0.75
    assert tasks[("libero_spatial", 1)]["successes"] == 0 and tasks[("libero_spatial", 1)]["errors"] == 1
    assert s["per_suite"]["libero_spatial"]["success_rate"] == pytest.approx(3 / 7)
    assert s["per_suite"]["libero_goal"]["success_rate"] == 1.0
    assert s["average"]["mean_over_suites"] == pytest.approx((3 / 7 + 1.0) / 2)
    assert s["average"]["pooled"] == pytest.approx(5 / 9)
    table = R.format_tables({"success": s, "latency": R.latency_summary(records)})
    assert "libero_goal" in table and " 75.0%" in table and "1 errors" in table


def test_latency_excludes_warmup_and_counts_batched_forwards_once():
    a = rec(ep=0, chunk_ms=[900.0, 100.0, 100.0, 200.0], chunk_model_ms=[800.0, 90.0, 90.0, 180.0],
            chunk_batch=[2, 2, 2, 1], chunk_warmup=[True, False, False, False], chunk_actions=[8, 8, 8, 5],
            tokens_kept=[None, None, None, None])
    b = rec(ep=1, chunk_ms=[900.0, 100.0, 100.0], chunk_model_ms=[None, None, None], chunk_batch=[2, 2, 2],
            chunk_warmup=[True, False, False], chunk_actions=[8, 8, 8], tokens_kept=[300, 200, 100])
    lat = R.latency_summary([a, b])
    assert lat["chunks"] == 5 and lat["warmup_chunks_excluded"] == 2
    assert lat["median_ms"] == 100.0
    assert lat["p90_ms"] == pytest.approx(160.0)          # numpy linear percentile of [100,100,100,100,200]
    # policy time: 4 chunks of a batch-2 forward (2 forwards of 100 ms) + one 200 ms forward = 0.4 s
    assert lat["policy_time_s"] == pytest.approx(0.4)
    assert lat["chunks_per_s"] == pytest.approx(5 / 0.4)
    assert lat["actions_per_chunk"] == 8 and lat["actions_per_s"] == pytest.approx(8 * 5 / 0.4)
    assert lat["model_median_ms"] == 90.0
    assert lat["mean_tokens_kept"] == 150.0
    assert R.latency_summary([rec()]) == {"chunks": 0, "warmup_chunks_excluded": 0, "capture_chunks_excluded": 0}
    # a chunk whose forward captured a CUDA graph is left out like a warm-up chunk, and counted
    c = rec(ep=2, chunk_ms=[100.0, 5000.0, 100.0], chunk_model_ms=[90.0, 4900.0, 90.0], chunk_batch=[1, 1, 1],
            chunk_warmup=[False, False, False], chunk_actions=[8, 8, 8], tokens_kept=[None] * 3,
            chunk_capture_ms=[0.0, 4800.0, 0.0])
    lat = R.latency_summary([c])
    assert lat["chunks"] == 2 and lat["capture_chunks_excluded"] == 1 and lat["max_ms"] == 100.0


def test_write_json_is_atomic(tmp_path):
    R.write_json(tmp_path / "results.json", {"a": 1})
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}
    assert not list(tmp_path.glob("*.tmp"))


# ---- typed config --------------------------------------------------------------------------------

def hydra_cfg(**over):
    base = {"policy": {"name": "random_tiny", "random": True}, "env": {"name": "libero"},
            "eval": {"suites": ["libero_spatial"]}, "prune": {"name": "none"}, "runtime": {"name": "reference"}}
    for group, values in over.items():
        base[group] = {**base[group], **values}
    return OmegaConf.create(base)


def test_config_defaults_validate():
    rc = run_config_from_hydra(hydra_cfg())
    assert rc.eval.num_envs == 1 and rc.eval.episodes is None and rc.env.image_size == 256


@pytest.mark.parametrize("group,values,message", [
    ("eval", {"num_envs": 0}, "eval.num_envs must be >= 1"),
    ("eval", {"shard": 3, "num_shards": 2}, r"eval.shard must be in 0..1"),
    ("eval", {"episodes": [1, 1]}, "lists an index twice"),
    ("eval", {"episodes": [1], "num_episodes": 3}, "either eval.episodes"),
    ("eval", {"worker_context": "fork"}, "spawn or forkserver"),
    ("eval", {"num_env": 2}, r"unknown setting\(s\) eval.num_env; known eval settings: suites, task_ids"),
    ("policy", {"random": False}, "policy.checkpoint is required"),
    ("policy", {"device": "gpu"}, "policy.device must be one of auto, cpu, cuda, cuda:N"),
    ("policy", {"dtype": "fp8"}, "policy.dtype must be one of auto, float32"),
    ("env", {"image_size": 8}, "env.image_size must be >= 16"),
])
def test_config_errors_say_what_is_allowed(group, values, message):
    with pytest.raises(ConfigError, match=message):
        run_config_from_hydra(hydra_cfg(**{group: values}))
