"""CPU: the accelerated runtime's control flow on the tiny model, against the plain reference model.

On CPU the runner works in "emulate" mode: the same packing, token buckets, static buffers and graph
bookkeeping as on a GPU, with each "graph replay" an eager call over the static buffers; "eager" mode runs
without buckets. Everything runs in fp32 here, so the runner must equal the reference to fp32 rounding
(TOL: 1e-5 relative -- the runner sums the same products in another order: fused QKV GEMM, addmm epilogues).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vla_accel
from benchmarks.e2e import WordTokenizer, prune_config
from vla_accel.protocols import Executor, Rows
from vla_accel.prune import KeepPlan
from vla_accel.runtime import AccelRunner, RuntimeConfig, RuntimeConfigError, make_executor, segments

TOL = dict(rtol=1e-5, atol=1e-5)
PROMPT_LENS = [[31], [31, 24], [12, 31, 27], [20, 20]]  # single, ragged, odd batch size (eager), equal lengths


@pytest.fixture(scope="module")
def policy():
    return vla_accel.random_policy("tiny", device="cpu", dtype=torch.float32, seed=0)


def tiny_policy(runtime=None):
    """A fresh tiny random policy with the word-level stand-in tokenizer, on `runtime` (None: the plain model)."""
    pol = vla_accel.random_policy("tiny", device="cpu", dtype=torch.float32, seed=0)
    pol.tokenizer = WordTokenizer()
    return pol if runtime is None else make_executor(pol, runtime)


def inputs(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, P = len(lens), max(lens)
    ids = torch.randint(3, 32000, (B, P), generator=g)
    ids[:, 0] = 1
    for b, n in enumerate(lens):
        ids[b, n - 1] = 29871
        ids[b, n:] = 32000
    return ids, torch.randn(B, 12, 224, 224, generator=g), torch.rand(B, 8, generator=g) * 2 - 1, torch.tensor(lens)


def reference(model, args, decisions=None):
    with torch.inference_mode():
        return model(*args[:3], prompt_lens=args[3], decisions=decisions)


def assert_same(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(g.dtype), **TOL)


def random_keep_plan(lens, layers_fracs, seed=1):
    """Original positions kept before each layer: all non-visual tokens + a random share of the visual ones."""
    g = torch.Generator().manual_seed(seed)
    prev = [torch.arange(n + 570) for n in lens]
    keep = {}
    for layer, frac in layers_fracs:
        cur = []
        for p in prev:
            vis, non = p[(p >= 1) & (p <= 512)], p[(p < 1) | (p > 512)]
            pick = torch.randperm(len(vis), generator=g)[:int(len(vis) * frac)]
            cur.append(torch.cat([non, vis[pick]]).sort().values)
        keep[layer] = cur
        prev = cur
    return KeepPlan(keep)


# ---------------------------------------------------------------- config and pure functions
def test_config_validation():
    with pytest.raises(RuntimeConfigError, match="unknown setting.*runtime.bucket"):
        RuntimeConfig.from_dict({"bucket": 3})
    with pytest.raises(RuntimeConfigError, match="runtime.attention must be one of"):
        RuntimeConfig(attention="fast")
    with pytest.raises(RuntimeConfigError, match="multiple of its step"):
        RuntimeConfig(bucket_steps=[[1000, 16]])
    with pytest.raises(RuntimeConfigError, match="must increase"):
        RuntimeConfig(bucket_steps=[[2048, 32], [1024, 16]])


@pytest.mark.parametrize("tokens,bucket", [(1, 16), (83, 96), (592, 592), (601, 608), (1024, 1024), (1025, 1056),
                                           (4808, 4864), (8192, 8192), (8193, None)])
def test_buckets(tokens, bucket):
    assert RuntimeConfig().bucket(tokens) == bucket


class Recorder:
    """Decisions that drop nothing: record the protocol calls; rows 513..519 (proprio, prompt) at `score_at`."""

    prune_layers, blocking_layers = (), ()

    def __init__(self, score_at=()):
        self.calls, self.score_layers = [], sorted(score_at)

    def keep(self, i):
        self.calls.append(("keep", i))
        return None

    def rows(self, i):
        self.calls.append(("rows", i))
        if i not in self.score_layers:
            return None
        return Rows(np.tile(np.arange(513, 520), (self.B, 1)), np.ones((self.B, 7), dtype=bool))

    def scores(self, i, key_mass):
        self.calls.append(("scores", i, tuple(key_mass.shape), round(float(key_mass.sum()), 4)))


def test_segments():
    assert segments(None, 8) == [(0, 7)]
    assert segments(Recorder(), 4) == [(0, 3)]
    assert segments(Recorder(score_at=(1,)), 4) == [(0, 1), (2, 3)]
    plan = KeepPlan({2: [[0]], 6: [[0]]})
    assert segments(plan, 8) == [(0, 1), (2, 5), (6, 7)]

    class Declared:
        score_layers, prune_layers = [0, 1, 12], [0, 1, 5, 10, 15, 20, 25]

    assert segments(Declared(), 32) == [(0, 0), (1, 1), (2, 5), (6, 10), (11, 12), (13, 15), (16, 20),
                                        (21, 25), (26, 31)]


def test_executors_declare_the_protocol(policy):
    assert isinstance(policy.model, Executor) and isinstance(AccelRunner(policy.model, RuntimeConfig()), Executor)


# ---------------------------------------------------------------- forward equivalence
@pytest.mark.parametrize("lens", PROMPT_LENS)
@pytest.mark.parametrize("mode", ["emulate", "eager"])
def test_unpruned_equals_reference(policy, lens, mode):
    runner = AccelRunner(policy.model, RuntimeConfig(on_cpu=mode))
    args = inputs(lens)
    assert_same(runner(*args[:3], prompt_lens=args[3]), reference(policy.model, args))
    st = runner.last_stats
    graphed = mode == "emulate" and len(lens) in runner.cfg.batch_sizes
    assert (st["graphed_segments"], st["eager_segments"]) == ((1, 0) if graphed else (0, 1))
    (a, b, T, T_pad, _), = st["segments"]
    assert T == sum(n + 570 for n in lens)
    assert T_pad == (runner.cfg.bucket(T) if graphed else T)


def test_buffers_reused_across_shapes(policy):
    """Replays after other shapes wrote the static buffers still give the reference's answer."""
    runner = AccelRunner(policy.model, RuntimeConfig())
    seq = [[31], [31, 24], [29], [31], [31, 24]]  # [29] and [31] share the 608 bucket
    for i, lens in enumerate(seq):
        args = inputs(lens, seed=i)
        assert_same(runner(*args[:3], prompt_lens=args[3]), reference(policy.model, args))
    g = runner.graphs.stats()
    assert g["captures"] == 4 + 2 and g["replays"] == 3 * len(seq)  # vision+head per B, backbone per (B, bucket)


def test_beyond_buckets_runs_eagerly(policy):
    runner = AccelRunner(policy.model, RuntimeConfig(bucket_steps=[[256, 16]]))
    args = inputs([31])
    assert_same(runner(*args[:3], prompt_lens=args[3]), reference(policy.model, args))
    assert runner.last_stats["segments"][0][4] is False  # 601 rows > 256: eager
    plan = random_keep_plan([31], [(1, 0.2)])  # 601 -> 89 + 102 = 191 rows after layer 0: back in a bucket
    out = runner(*args[:3], prompt_lens=args[3], decisions=plan)
    assert_same(out, reference(policy.model, args, plan))
    assert [s[4] for s in runner.last_stats["segments"]] == [False, True]


@pytest.mark.parametrize("lens", [[31], [31, 24], [12, 31, 27, 20]])
def test_plan_application_ragged(policy, lens):
    plan = random_keep_plan(lens, [(1, 0.3), (3, 0.5), (6, 0.4)])
    runner = AccelRunner(policy.model, RuntimeConfig())
    args = inputs(lens, seed=2)
    got = runner(*args[:3], prompt_lens=args[3], decisions=plan)
    want = reference(policy.model, args, plan)
    assert_same(got, want)
    assert not torch.allclose(want[0], reference(policy.model, args)[0])  # the plan changes the answer
    assert [s[:2] for s in runner.last_stats["segments"]] == [(0, 0), (1, 2), (3, 5), (6, 7)]
    counts = [s[2] for s in runner.last_stats["segments"]]
    assert counts[0] > counts[1] > counts[2] > counts[3]


def test_decisions_protocol_order_and_scores(policy):
    """Decisions see the same calls, in the same order, and the same key mass from both executors."""
    args = inputs([31, 24])
    rec_ref, rec_acc = Recorder(score_at=(0, 5)), Recorder(score_at=(0, 5))
    rec_ref.B = rec_acc.B = 2
    reference(policy.model, args, rec_ref)
    AccelRunner(policy.model, RuntimeConfig())(*args[:3], prompt_lens=args[3], decisions=rec_acc)
    assert [c[:3] for c in rec_acc.calls] == [c[:3] for c in rec_ref.calls]
    assert [c[0] for c in rec_ref.calls[:3]] == ["keep", "rows", "scores"]
    mass_acc = [c[3] for c in rec_acc.calls if c[0] == "scores"]
    mass_ref = [c[3] for c in rec_ref.calls if c[0] == "scores"]
    assert mass_acc == pytest.approx(mass_ref, rel=1e-4) and len(mass_ref) == 2


def test_undeclared_change_inside_segment_fails(policy):
    lens = [31]
    plan = random_keep_plan(lens, [(3, 0.5)])
    plan.prune_layers = []  # drops tokens before layer 3 but declares no prune layer there
    args = inputs(lens)
    with pytest.raises(RuntimeError, match="prune_layers"):
        AccelRunner(policy.model, RuntimeConfig())(*args[:3], prompt_lens=args[3], decisions=plan)


def test_keep_plan_checks_its_positions(policy):
    with pytest.raises(ValueError, match="layers >= 1"):
        KeepPlan({0: [[0, 1]]})
    with pytest.raises(ValueError, match="strictly ascending"):
        KeepPlan({2: [[0, 5, 3]]})
    plan = KeepPlan({2: [[0, 1, 2, 600]], 4: [[0, 2, 7]]})  # 7 was dropped before layer 2
    assert plan.keep(0) is None and plan.keep(1) is None
    k = plan.keep(2)
    assert k.index.tolist() == [[0, 1, 2, 600]] and k.counts.tolist() == [4]  # the unpruned sequence: index == position
    with pytest.raises(ValueError, match="not in the sequence"):
        plan.keep(4)


def test_specprune_same_decisions_and_actions():
    """SpecPrune (the pruning package's actor) on the accel executor == on the reference executor."""
    from vla_accel.prune import make_actor

    cfg = prune_config(None)  # configs/prune/specprune.yaml
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8) for _ in range(3)]
    actors = []
    for accel in (False, True):
        pol = tiny_policy({"name": "accel"} if accel else None)
        actors.append(make_actor(pol, cfg))
    for t, f in enumerate(frames):
        obs = [{"full_image": f[0], "wrist_image": f[1], "state": np.zeros(8)}] * 2
        res = []
        for actor in actors:
            for st in actor.streams.values():
                st.queue.clear()
            res.append(actor.act_batch(obs, ["pick up the bowl"] * 2, [0, 1]))
        (a_ref, i_ref), (a_acc, i_acc) = res
        assert [i["kept_per_layer"] for i in i_acc] == [i["kept_per_layer"] for i in i_ref]
        assert i_ref[0]["kept_per_layer"][-1] < i_ref[0]["kept_per_layer"][0]  # it did prune
        np.testing.assert_allclose(a_acc, a_ref, rtol=1e-5, atol=1e-5)


def test_specprune_ragged_batch_packs_from_host_decisions():
    """Ragged SpecPrune batch (prompts of different lengths): the runner packs each pruned layer from the plan's
    host Keep (counts and indices, no device read), and actions equal the reference's under the same decisions."""
    from vla_accel.prune import make_actor

    cfg = prune_config(None)  # configs/prune/specprune.yaml
    pol = tiny_policy({"name": "accel"})
    runner = pol.executor
    actor = make_actor(pol, cfg)
    rng = np.random.default_rng(3)
    obs = [{"full_image": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
            "wrist_image": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "state": np.zeros(8)} for _ in range(3)]
    texts = ["pick up the bowl", "put the black bowl on the plate next to the cookie box", "open the drawer"]
    actions, _ = actor.act_batch(obs, texts, [0, 1, 2])
    plan = actor.last_plan
    assert plan.kept and any(not k.uniform for k in plan.kept.values())
    rows = {a: T for a, _, T, _, _ in runner.last_stats["segments"]}
    for i, k in plan.kept.items():
        assert rows[i] == int(k.counts.sum())
    ids, pix, prop = pol.prepare(obs, texts)
    ids_t, lens = pol.batch_ids(ids)
    with torch.inference_mode():
        ref = pol.model(ids_t, pix, prop, prompt_lens=lens, decisions=KeepPlan.from_prune_plan(plan))[0]
    acc = runner(ids_t, pix, prop, prompt_lens=lens, decisions=KeepPlan.from_prune_plan(plan))[0]
    torch.testing.assert_close(acc, ref, rtol=1e-5, atol=1e-5)
    assert np.isfinite(actions).all()


@pytest.mark.parametrize("texts", [["pick up the bowl"], ["pick up the bowl", "open the top drawer of the cabinet"]])
def test_specprune_kernel_scores_same_decisions(texts):
    """SpecPrune with the attention kernel's key mass (runtime.scores=kernel, Triton interpreter on CPU): the
    same token sets and actions as the reference executor. One stream: the score rows are selected from the
    plan's host rows on uniform packed rows; two streams of different prompt lengths: on ragged packed rows."""
    from vla_accel.prune import make_actor

    cfg = prune_config(None)  # configs/prune/specprune.yaml
    rng = np.random.default_rng(5)
    obs = [{"full_image": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
            "wrist_image": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "state": np.zeros(8)} for _ in texts]
    res = []
    for rt in (None, {"name": "accel", "attention": "kernels", "scores": "kernel"}):
        pol = tiny_policy(rt)
        if rt:
            assert pol.executor.ops.scores == "kernel"
        actor = make_actor(pol, cfg)
        res.append(actor.act_batch(obs, texts, list(range(len(texts)))))
    (a_ref, i_ref), (a_acc, i_acc) = res
    assert [i["kept_per_layer"] for i in i_acc] == [i["kept_per_layer"] for i in i_ref]
    assert i_ref[0]["kept_per_layer"][-1] < i_ref[0]["kept_per_layer"][0]
    np.testing.assert_allclose(a_acc, a_ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- policy integration
def test_make_executor_and_predict(policy):
    pol = tiny_policy()
    assert make_executor(pol, {"name": "reference"}) is pol and pol.executor is pol.model
    rng = np.random.default_rng(1)
    obs = {"full_image": rng.integers(0, 255, (128, 128, 3), dtype=np.uint8),
           "wrist_image": rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), "state": np.zeros(8)}
    want = pol.predict(obs, "put the bowl on the plate")
    q_before = pol.model.llm.layers[0].self_attn.q_proj.weight.detach().clone()
    fast = make_executor(pol, {"name": "accel", "on_cpu": "emulate"})
    assert pol.executor is pol.model and pol.describe()["executor"] == "reference"  # passed in, not patched on
    assert fast.model is pol.model and fast.describe()["executor"] == "accel-emulate-cpu"
    assert fast.describe()["runtime"]["mode"] == "emulate" and "runtime" not in pol.describe()
    np.testing.assert_allclose(fast.predict(obs, "put the bowl on the plate"), want, rtol=1e-5, atol=1e-5)
    # share_weights: the model's q_proj is now a row view of the fused QKV buffer, same values
    fused = fast.executor.layers[0].qkv
    q = pol.model.llm.layers[0].self_attn.q_proj.weight
    assert q.data_ptr() == fused.data_ptr() and torch.equal(q, q_before)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        make_executor(pol, {"name": "accel", "on_cpu": "error"})
