"""LIBERO evaluation of OpenVLA-OFT: `vla-accel-eval` (cli.py) and `vla-accel-merge` (merge.py).

config.py   typed, validated settings (policy / env / eval groups of vla_accel/configs)
shard.py    the (suite, task, episode) selection and its shards
factory.py  actor (policy -> runtime -> prune/chunked actor) and LIBERO env construction
runner.py   vectorized rollouts: N simulator subprocesses, one batched policy call per step
workers.py  the simulator worker processes under supervision (bounded waits, replacement)
faults.py   TESTING ONLY: fault-injection points ($VLA_ACCEL_FAULTS), used by tests/test_eval_faults.py
results.py  results.jsonl records, results.json summary, success / latency tables
video.py    per-episode MP4s and rollout traces
Guide: docs/evaluation.md.
"""
