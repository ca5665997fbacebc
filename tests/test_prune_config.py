"""SpecPrune settings: YAML files, validation at construction, make_actor dispatch."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import vla_accel
from vla_accel.policy import ChunkedActor
from vla_accel.prune import PruneConfigError, SpecPrune, SpecPruneConfig, make_actor

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "prune"
MINE = ["specprune", "static_only", "dynamic_only"]


@pytest.fixture(scope="module")
def tiny():
    return vla_accel.random_policy("tiny")


@pytest.mark.parametrize("stem", MINE)
def test_yaml_names_and_comments(stem):
    path = CONFIG_DIR / f"{stem}.yaml"
    cfg = SpecPruneConfig.from_dict(OmegaConf.load(path))
    assert cfg.name == stem
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" in line, f"{path.name}: setting without a comment: {line!r}"


def test_yaml_parts():
    load = lambda s: SpecPruneConfig.from_dict(OmegaConf.load(CONFIG_DIR / f"{s}.yaml"))  # noqa: E731
    full, st, dy = load("specprune"), load("static_only"), load("dynamic_only")
    assert full.static.enabled and full.dynamic.enabled and full.controller.enabled
    assert st.static.enabled and not st.dynamic.enabled
    assert dy.dynamic.enabled and not dy.static.enabled
    # the paper's reference values
    assert full.static.topk == (16, 12) and full.static.topk_fine == (25, 19)
    assert full.static.changed.max_static == (200, 200) and full.static.changed.sim_threshold == 0.986
    assert full.dynamic.layers == (5, 10, 15, 20, 25) and full.dynamic.keep_ratio == 0.8
    assert full.resolve(32).dynamic_layers == (5, 10, 15, 20, 25)
    assert full.resolve(8).dynamic_layers == (2, 3, 4, 5, 6)


@pytest.mark.parametrize("values, words", [
    ({"dynamic": {"keep_ratio": 0.0}}, ["dynamic.keep_ratio", "(0, 1]"]),
    ({"dynamic": {"keep_ratio": 1.5}}, ["dynamic.keep_ratio", "(0, 1]"]),
    ({"dynamic": {"ema_alpha": -0.1}}, ["dynamic.ema_alpha", "(0, 1]"]),
    ({"static": {"topk": [16]}}, ["static.topk", "2 entries"]),
    ({"static": {"topk": [16, -1]}}, ["static.topk", ">= 0"]),
    ({"static": {"layers": [1, 0]}}, ["static.layers", "increasing"]),
    ({"static": {"changed": {"gap_min": 4, "gap_max": 2}}}, ["gap_min", "gap_max"]),
    ({"static": {"colour": 1}}, ["static.colour", "known static settings"]),
    ({"speed": 1}, ["prune.speed", "known prune settings"]),
    ({"layers_for_depth": {"eight": {}}}, ["layers_for_depth", "integers"]),
    ({"layers_for_depth": {8: {"dyn": [1]}}}, ["layers_for_depth.8", "dyn"]),
])
def test_bad_values_fail_at_construction(values, words):
    with pytest.raises(PruneConfigError) as err:
        SpecPruneConfig.from_dict({"name": "x", **values})
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("values, words", [
    ({"static": {"topk": [300, 12]}}, ["static.topk", "256 patches"]),
    ({"static": {"topk": [100, 12]}}, ["first_factor", "256 patches"]),  # 3 * 100 > 256
    ({"static": {"global_topk": [16, 257]}}, ["static.global_topk", "256 patches"]),
    ({"static": {"changed": {"max_static": [257, 200]}}}, ["max_static", "256 patches"]),
    ({"dynamic": {"min_visual": 600}}, ["min_visual", "512"]),
    ({"dynamic": {"layers": [5, 10, 31]}}, ["dynamic_layers", "[31]", "0..30"]),
    ({"dynamic": {"score_layers": [0, 32]}}, ["score_layers", "[32]", "0..31"]),
    ({"dynamic": {"layers": [1, 5]}}, ["must all come after the last static layer 1"]),
])
def test_model_dependent_checks(values, words):
    cfg = SpecPruneConfig.from_dict({"name": "x", **values})
    with pytest.raises(PruneConfigError) as err:
        cfg.resolve(32)
    for w in words:
        assert w in str(err.value)


def test_depth_without_schedule_names_the_fix(tiny):
    cfg = {"name": "paper_only"}  # the paper's 32-layer indices, no entry for the tiny model's 8 layers
    with pytest.raises(PruneConfigError) as err:
        SpecPrune(tiny, cfg)
    msg = str(err.value)
    assert "[10, 15, 20, 25]" in msg and "0..6" in msg and "layers_for_depth.8" in msg


def test_make_actor_dispatch(tiny):
    assert isinstance(make_actor(tiny, OmegaConf.create({"name": "none"})), ChunkedActor)
    actor = make_actor(tiny, OmegaConf.load(CONFIG_DIR / "specprune.yaml"))
    assert isinstance(actor, SpecPrune)
    d = actor.describe()
    assert d["prune"] == "specprune" and d["prune_layers"]["dynamic"] == [2, 3, 4, 5, 6]
    with pytest.raises(PruneConfigError, match="needs a 'name'"):
        make_actor(tiny, {"static": {}})
