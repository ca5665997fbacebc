"""Which episodes an evaluation runs: the selection (suite, task, episode) and its shards.

The selection is sorted (suite order as given, then task, then episode). Shard i of n takes the
items at positions i, i+n, i+2n, ... : disjoint, deterministic, n shards cover it exactly once,
shard sizes differ by at most one, and every shard sees the tasks in the same order (so each
simulator worker rebuilds its scene no more often than in an unsharded run).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

from vla_accel.eval.config import ConfigError


class EpisodeKey(NamedTuple):
    suite: str
    task_id: int
    episode: int

    def label(self) -> str:
        return f"{self.suite}/task{self.task_id}/ep{self.episode}"


def _ranges(values: Sequence[int]) -> str:
    return f"{min(values)}..{max(values)}" if values else "none"


def build_selection(
    suites: Sequence[str],
    task_ids: Sequence[int] | None,
    episodes: Sequence[int] | None,
    num_episodes: int | None,
    *,
    valid_suites: Sequence[str],
    num_tasks: Callable[[str], int],
    num_init_states: Callable[[str, int], int],
) -> list[EpisodeKey]:
    """All (suite, task, episode) to evaluate; bad names / indices fail listing the valid ones.

    num_tasks(suite) and num_init_states(suite, task) come from the env catalog
    (vla_accel.envs); tests pass small fakes.
    """
    unknown = [s for s in suites if s not in valid_suites]
    if unknown:
        raise ConfigError(f"unknown suite(s) {unknown} in eval.suites; valid suites: {', '.join(valid_suites)}")
    keys: list[EpisodeKey] = []
    for suite in suites:
        n_tasks = num_tasks(suite)
        tasks = list(range(n_tasks)) if task_ids is None else list(task_ids)
        bad = [t for t in tasks if not 0 <= t < n_tasks]
        if bad:
            raise ConfigError(f"eval.task_ids: task id(s) {bad} do not exist in {suite}; "
                              f"valid task ids: {_ranges(range(n_tasks))}")
        for task in tasks:
            n_eps = num_init_states(suite, task)
            if episodes is not None:
                eps = list(episodes)
                bad = [e for e in eps if not 0 <= e < n_eps]
                if bad:
                    raise ConfigError(f"eval.episodes: episode index(es) {bad} do not exist for {suite} "
                                      f"task {task}; valid episode indices: {_ranges(range(n_eps))}")
            elif num_episodes is not None:
                if num_episodes > n_eps:
                    raise ConfigError(f"eval.num_episodes={num_episodes} but {suite} task {task} has "
                                      f"only {n_eps} init states; valid: 1..{n_eps}")
                eps = list(range(num_episodes))
            else:
                eps = list(range(n_eps))
            keys.extend(EpisodeKey(suite, task, e) for e in sorted(eps))
    return keys


def shard_selection(selection: Sequence[EpisodeKey], shard: int, num_shards: int) -> list[EpisodeKey]:
    """Shard `shard` of `num_shards`: every num_shards-th item starting at `shard`."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ConfigError(f"eval.shard must be in 0..{num_shards - 1}; got shard={shard}, num_shards={num_shards}")
    return list(selection[shard::num_shards])
