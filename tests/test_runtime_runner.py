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
from vla_accel.runtime import AccelRunner, RuntimeConfig, RuntimeConfigError, hook_segments, make_executor
from vla_accel.runtime.plan import KeepPlan

TOL = dict(rtol=1e-5, atol=1e-5)
PROMPT_LENS = [[31], [31, 24], [12, 31, 27], [20, 20]]  # single, ragged, odd batch size (eager), equal lengths


@pytest.fixture(scope="module")
def policy():
    return vla_accel.random_policy("tiny", device="cpu", dtype=torch.float32, seed=0)


def tiny_policy(runtime=None):
    """A fresh tiny random policy with the word-level stand-in tokenizer, on `runtime` (None: the plain model)."""
    pol = vla_accel.random_policy("tiny", device="cpu", dtype=torch.float32, seed=0)
    pol.tokenizer = WordTokenizer()
    if runtime is not None:
        make_executor(pol, runtime)
    return pol


def inputs(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, P = len(lens), max(lens)
    ids = torch.randint(3, 32000, (B, P), generator=g)
    ids[:, 0] = 1
    for b, n in enumerate(lens):
        ids[b, n - 1] = 29871
        ids[b, n:] = 32000
    return ids, torch.randn(B, 12, 224, 224, generator=g), torch.rand(B, 8, generator=g) * 2 - 1, torch.tensor(lens)


def reference(model, args, hook=None):
    with torch.inference_mode():
        return model(*args[:3], prompt_lens=args[3], hook=hook)


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
        width = max(len(c) for c in cur)
        pos = torch.zeros(len(lens), width, dtype=torch.long)
        mask = torch.zeros(len(lens), width, dtype=torch.bool)
        for b, c in enumerate(cur):
            pos[b, :len(c)], mask[b, :len(c)] = c, True
        keep[layer] = (pos, None if all(len(c) == width for c in cur) else mask)
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
    """A generic hook (no layer declarations): records the protocol calls, changes nothing."""

    def __init__(self, score_at=()):
        self.calls, self.score_at = [], set(score_at)

    def before_layer(self, i, h, positions, key_mask):
        self.calls.append(("before", i, tuple(h.shape)))
        return h, positions, key_mask

    def score_rows(self, i, positions, key_mask):
        self.calls.append(("rows", i))
        if i not in self.score_at:
            return None
        B = positions.shape[0]
        return torch.arange(513, 520)[None].expand(B, 7), torch.ones(B, 7, dtype=torch.bool)

    def on_scores(self, i, key_mass, positions, key_mask):
        self.calls.append(("scores", i, tuple(key_mass.shape), round(float(key_mass.sum()), 4)))


def test_hook_segments():
    assert hook_segments(None, 8) == [(0, 7)]
    assert hook_segments(Recorder(), 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    plan = KeepPlan({2: (torch.zeros(1, 1, dtype=torch.long), None), 6: (torch.zeros(1, 1, dtype=torch.long), None)})
    assert hook_segments(plan, 8) == [(0, 1), (2, 5), (6, 7)]

    class Declared:
        score_layers, prune_layers = [0, 1, 12], [0, 1, 5, 10, 15, 20, 25]

    assert hook_segments(Declared(), 32) == [(0, 0), (1, 1), (2, 5), (6, 10), (11, 12), (13, 15), (16, 20),
                                             (21, 25), (26, 31)]


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
    out = runner(*args[:3], prompt_lens=args[3], hook=plan)
    assert_same(out, reference(policy.model, args, plan))
    assert [s[4] for s in runner.last_stats["segments"]] == [False, True]


@pytest.mark.parametrize("lens", [[31], [31, 24], [12, 31, 27, 20]])
def test_plan_application_ragged(policy, lens):
    plan = random_keep_plan(lens, [(1, 0.3), (3, 0.5), (6, 0.4)])
    runner = AccelRunner(policy.model, RuntimeConfig())
    args = inputs(lens, seed=2)
    got = runner(*args[:3], prompt_lens=args[3], hook=plan)
    want = reference(policy.model, args, plan)
    assert_same(got, want)
    assert not torch.allclose(want[0], reference(policy.model, args)[0])  # the plan changes the answer
    assert [s[:2] for s in runner.last_stats["segments"]] == [(0, 0), (1, 2), (3, 5), (6, 7)]
    counts = [s[2] for s in runner.last_stats["segments"]]
    assert counts[0] > counts[1] > counts[2] > counts[3]


def test_hook_protocol_order_and_scores(policy):
    """A generic hook sees the same calls, shapes and key mass as on the reference model."""
    args = inputs([31, 24])
    rec_ref, rec_acc = Recorder(score_at=(0, 5)), Recorder(score_at=(0, 5))
    reference(policy.model, args, rec_ref)
    AccelRunner(policy.model, RuntimeConfig())(*args[:3], prompt_lens=args[3], hook=rec_acc)
    assert [c[:3] for c in rec_acc.calls] == [c[:3] for c in rec_ref.calls]
    mass_acc = [c[3] for c in rec_acc.calls if c[0] == "scores"]
    mass_ref = [c[3] for c in rec_ref.calls if c[0] == "scores"]
    assert mass_acc == pytest.approx(mass_ref, rel=1e-4) and len(mass_ref) == 2


def test_undeclared_change_inside_segment_fails(policy):
    class Liar(KeepPlan):  # drops tokens before layer 3 but declares no prune layer there
        def __init__(self, keep):
            super().__init__(keep)
            self.prune_layers = []

    lens = [31]
    plan = random_keep_plan(lens, [(3, 0.5)])
    args = inputs(lens)
    with pytest.raises(RuntimeError, match="prune_layers"):
        AccelRunner(policy.model, RuntimeConfig())(*args[:3], prompt_lens=args[3], hook=Liar(plan.keep))


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


def test_specprune_ragged_batch_uses_host_counts():
    """Ragged SpecPrune batch (prompts of different lengths): the runner packs each pruned layer from the plan's
    host counts (PrunePlan.kept_counts, no device read); they equal the key masks, and actions equal the
    reference's under the same decisions."""
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
    assert plan.kept_counts and any(plan.kept_mask[i] is not None for i in plan.kept_counts)
    for i, counts in plan.kept_counts.items():
        mask = plan.kept_mask[i]
        want = mask.sum(1) if mask is not None else torch.full((3,), plan.kept_positions[i].shape[1])
        assert counts.tolist() == want.tolist()
    rows = {a: T for a, _, T, _, _ in runner.last_stats["segments"]}
    for i, counts in plan.kept_counts.items():
        assert rows[i] == int(counts.sum())
    ids, pix, prop = pol.prepare(obs, texts)
    ids_t, lens = pol.batch_ids(ids)
    with torch.inference_mode():
        ref = pol.model(ids_t, pix, prop, prompt_lens=lens, hook=KeepPlan.from_prune_plan(plan))[0]
    acc = runner(ids_t, pix, prop, prompt_lens=lens, hook=KeepPlan.from_prune_plan(plan))[0]
    torch.testing.assert_close(acc, ref, rtol=1e-5, atol=1e-5)
    assert np.isfinite(actions).all()


@pytest.mark.parametrize("texts", [["pick up the bowl"], ["pick up the bowl", "open the top drawer of the cabinet"]])
def test_specprune_kernel_scores_same_decisions(texts):
    """SpecPrune with the attention kernel's key mass (runtime.scores=kernel, Triton interpreter on CPU): the
    same token sets and actions as the reference executor. One stream: the score rows are selected from the
    plan's host rows (no device ops); two streams of different prompt lengths: the device path."""
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
    assert make_executor(pol, {"name": "reference"}).executor is pol.model
    rng = np.random.default_rng(1)
    obs = {"full_image": rng.integers(0, 255, (128, 128, 3), dtype=np.uint8),
           "wrist_image": rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), "state": np.zeros(8)}
    want = pol.predict(obs, "put the bowl on the plate")
    q_before = pol.model.llm.layers[0].self_attn.q_proj.weight.detach().clone()
    make_executor(pol, {"name": "accel", "on_cpu": "emulate"})
    assert pol.executor_name == "accel-emulate-cpu" and pol.describe()["runtime"]["mode"] == "emulate"
    np.testing.assert_allclose(pol.predict(obs, "put the bowl on the plate"), want, rtol=1e-5, atol=1e-5)
    # share_weights: the model's q_proj is now a row view of the fused QKV buffer, same values
    fused = pol.executor.layers[0].qkv
    q = pol.model.llm.layers[0].self_attn.q_proj.weight
    assert q.data_ptr() == fused.data_ptr() and torch.equal(q, q_before)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        make_executor(pol, {"name": "accel", "on_cpu": "error"})
