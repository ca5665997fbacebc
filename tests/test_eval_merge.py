"""vla-accel-merge: shards gathered into one table; missing / duplicated episodes are named."""

import json

import pytest

from vla_accel.eval import merge as M, results as R
from vla_accel.eval.config import fingerprint
from vla_accel.eval.shard import EpisodeKey, shard_selection

SELECTION = [EpisodeKey("libero_spatial", t, e) for t in range(2) for e in range(3)]   # 6 episodes


def make_run(path, shard, num_shards, *, prune="none", keys=None, success=lambda k: k.episode != 1):
    fields = {"policy": {"name": "random_tiny"}, "env": {"image_size": 64}, "prune": {"name": prune},
              "runtime": {"name": "reference"}, "seed": 0, "num_shards": num_shards,
              "selection": [list(k) for k in SELECTION]}
    path.mkdir(parents=True)
    R.write_json(path / R.RUN_FILE, {"fingerprint": fingerprint(fields), "fingerprint_fields": fields,
                                     "shard": shard, "num_shards": num_shards})
    keys = shard_selection(SELECTION, shard, num_shards) if keys is None else keys
    with R.ResultsWriter(path / R.RESULTS_FILE) as w:
        for k in keys:
            w.append({"suite": k.suite, "task_id": k.task_id, "task": f"t{k.task_id}", "episode": k.episode,
                      "success": success(k), "steps": 5, "wall_s": 1.0, "error": None,
                      "chunk_ms": [50.0], "chunk_batch": [1], "chunk_warmup": [False], "chunk_actions": [5]})
    R.write_json(path / R.SUMMARY_FILE, {"policy": {"name": "openvla-oft"}, "random_weights": True,
                                         "device": "cpu", "throughput": {}})
    return path


def drop_line(path, key):
    lines = (path / R.RESULTS_FILE).read_text().splitlines()
    kept = [l for l in lines if R.key_of(json.loads(l)) != key]
    assert len(kept) == len(lines) - 1
    (path / R.RESULTS_FILE).write_text("\n".join(kept) + "\n")


def test_two_shards_merge_into_the_full_table(tmp_path, capsys):
    make_run(tmp_path / "sweep" / "0", 0, 2)
    make_run(tmp_path / "sweep" / "1", 1, 2)
    (report,) = M.merge([tmp_path / "sweep"])
    assert report.ok and len(report.records) == 6
    assert report.summary["success"]["average"]["pooled"] == pytest.approx(4 / 6)   # episode 1 fails
    assert M.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "COMPLETE" in out and "6/6 episodes" in out and "66.7%" in out
    assert len(R.read_records(tmp_path / "merged" / R.RESULTS_FILE)) == 6
    assert (tmp_path / "merged" / R.REPORT_FILE).read_bytes()[:4] == b"\x89PNG"     # the merged report.png


def test_removed_episode_is_reported_missing(tmp_path, capsys):
    make_run(tmp_path / "a", 0, 2)
    b = make_run(tmp_path / "b", 1, 2)
    drop_line(b, EpisodeKey("libero_spatial", 1, 0))
    (report,) = M.merge([tmp_path / "a", tmp_path / "b"])
    assert report.missing == [EpisodeKey("libero_spatial", 1, 0)] and not report.ok
    assert M.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    out = capsys.readouterr().out
    assert "MISSING: 1 episode(s) in no results.jsonl: libero_spatial/task1/ep0" in out


def test_missing_shard_and_duplicates_are_named(tmp_path, capsys):
    make_run(tmp_path / "s0", 0, 3)
    # shard 1 ran twice (two dirs); shard 2 never ran
    make_run(tmp_path / "s1", 1, 3)
    make_run(tmp_path / "s1-again", 1, 3)
    (report,) = M.merge([tmp_path])
    assert report.missing_shards == [2]
    assert sorted(report.duplicates) == shard_selection(SELECTION, 1, 3)
    assert sorted(report.missing) == shard_selection(SELECTION, 2, 3)
    assert M.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "MISSING SHARDS: [2]" in out and "DUPLICATED: 2 episode(s)" in out
    assert "SHARD 1 appears in 2 run dirs" in out


def test_duplicate_inside_one_file(tmp_path):
    run = make_run(tmp_path / "r", 0, 1)
    with R.ResultsWriter(run / R.RESULTS_FILE) as w:
        w.append(R.read_records(run / R.RESULTS_FILE)[0])
    (report,) = M.merge([run])
    assert list(report.duplicates) == [SELECTION[0]] and not report.missing


def test_sweep_over_settings_is_merged_per_setting(tmp_path, capsys):
    for prune in ("none", "specprune"):
        for shard in range(2):
            make_run(tmp_path / f"{prune}{shard}", shard, 2, prune=prune)
    reports = M.merge([tmp_path])
    assert len(reports) == 2 and all(r.ok and len(r.records) == 6 for r in reports)
    assert M.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert 'prune={"name": "none"}' in out and 'prune={"name": "specprune"}' in out
    assert M.main([str(tmp_path), "--out", str(tmp_path / "m")]) == 2     # --out needs one evaluation


def test_not_a_run_dir(tmp_path, capsys):
    assert M.main([str(tmp_path)]) == 2
    assert "no run.json" in capsys.readouterr().err


def test_out_never_replaces_a_runs_results(tmp_path, capsys):
    # issue 12, item 2: --out EXISTING_RUN_DIR replaced that run's results.jsonl without a word
    a = make_run(tmp_path / "a", 0, 2)
    b = make_run(tmp_path / "b", 1, 2)
    before = (a / R.RESULTS_FILE).read_bytes()
    assert M.main([str(a), str(b), "--out", str(a)]) == 2
    assert "is a run dir of vla-accel-eval" in capsys.readouterr().err
    assert (a / R.RESULTS_FILE).read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / R.RESULTS_FILE).write_text("precious\n")
    assert M.main([str(a), str(b), "--out", str(other)]) == 2
    assert "did not write" in capsys.readouterr().err and (other / R.RESULTS_FILE).read_text() == "precious\n"
    # a previous merge in the same --out is replaced (re-merging after more shards finished)
    merged = tmp_path / "merged"
    assert M.main([str(a), "--out", str(merged)]) == 1                   # shard 1 missing
    assert M.main([str(a), str(b), "--out", str(merged)]) == 0
    assert len(R.read_records(merged / R.RESULTS_FILE)) == 6
    assert not [p for p in merged.iterdir() if p.name.endswith(".tmp")]
