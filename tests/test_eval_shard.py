"""Selection and sharding of (suite, task, episode): disjoint, complete, deterministic; bad input names valid values."""

import itertools

import pytest

from vla_accel.eval.config import ConfigError
from vla_accel.eval.shard import EpisodeKey, build_selection, shard_selection

SUITES = {"libero_spatial": 10, "libero_goal": 10, "libero_90": 90}
INIT_STATES = 50


def select(suites=("libero_spatial",), task_ids=None, episodes=None, num_episodes=None):
    return build_selection(suites, task_ids, episodes, num_episodes, valid_suites=list(SUITES),
                           num_tasks=SUITES.__getitem__, num_init_states=lambda s, t: INIT_STATES)


# sizes include primes and sizes smaller than the shard count
SELECTION_SIZES = [1, 2, 7, 50, 83, 500]
SHARD_COUNTS = [1, 2, 3, 8, 13]


@pytest.mark.parametrize("size,num_shards", list(itertools.product(SELECTION_SIZES, SHARD_COUNTS)))
def test_shards_are_disjoint_and_cover_the_selection_once(size, num_shards):
    selection = select(task_ids=list(range(10)))[:size]
    shards = [shard_selection(selection, i, num_shards) for i in range(num_shards)]
    flat = [k for s in shards for k in s]
    assert sorted(flat) == sorted(selection)          # complete, and no episode twice
    assert len(set(flat)) == len(flat)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1               # balanced


def test_shards_are_deterministic_and_keep_task_order():
    selection = select(task_ids=[0, 1, 2], num_episodes=5)
    assert shard_selection(selection, 1, 4) == shard_selection(list(selection), 1, 4)
    shard = shard_selection(selection, 0, 2)
    assert shard == sorted(shard, key=lambda k: (k.task_id, k.episode))
    assert shard[:3] == [EpisodeKey("libero_spatial", 0, 0), EpisodeKey("libero_spatial", 0, 2),
                         EpisodeKey("libero_spatial", 0, 4)]


@pytest.mark.parametrize("shard,num_shards", [(2, 2), (-1, 2), (0, 0)])
def test_bad_shard_index_names_the_range(shard, num_shards):
    with pytest.raises(ConfigError, match="eval.shard"):
        shard_selection(select(), shard, num_shards)


def test_default_selection_is_all_tasks_all_init_states():
    selection = select(suites=["libero_spatial", "libero_goal"])
    assert len(selection) == 2 * 10 * INIT_STATES
    assert selection[0] == EpisodeKey("libero_spatial", 0, 0)
    assert selection[-1] == EpisodeKey("libero_goal", 9, INIT_STATES - 1)


def test_explicit_tasks_and_episodes():
    selection = select(task_ids=[3, 1], episodes=[7, 2])
    assert selection == [EpisodeKey("libero_spatial", 3, 2), EpisodeKey("libero_spatial", 3, 7),
                         EpisodeKey("libero_spatial", 1, 2), EpisodeKey("libero_spatial", 1, 7)]
    assert len(select(num_episodes=3)) == 30


def test_unknown_suite_lists_valid_suites():
    with pytest.raises(ConfigError, match=r"libero_spatisl.*valid suites: libero_spatial, libero_goal, libero_90"):
        select(suites=["libero_spatisl"])


def test_unknown_task_lists_valid_range():
    with pytest.raises(ConfigError, match=r"task id\(s\) \[10\] do not exist in libero_spatial; valid task ids: 0..9"):
        select(task_ids=[0, 10])


def test_unknown_episode_lists_valid_range():
    with pytest.raises(ConfigError, match=r"\[50\].*valid episode indices: 0..49"):
        select(task_ids=[0], episodes=[50])
    with pytest.raises(ConfigError, match="only 50 init states"):
        select(num_episodes=51)
