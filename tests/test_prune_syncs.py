"""Host <-> device traffic of the pruning plan, counted on CPU.

On CPU every tensor lives on the same device, so a `.cpu()` costs nothing and cannot be seen. Here the tensors
that live on the executor's device on a GPU (what the executor hands to the hook: h, positions, key_mask,
key_mass; what the plan sends with `to_device`) are wrapped in `Dev`, a tensor subclass that records every call
that would read a device tensor back to the host on CUDA (a sync): .cpu(), .item(), .tolist(), .numpy(),
int() / bool() / float(), torch.equal(), .to(cpu), ... and every op that mixes a device tensor with a
non-scalar host tensor (an error on CUDA). Results of ops on Dev tensors stay Dev, so derived tensors are
tracked too.

Also: the kept token sets of a SpecPrune forward equal an independent, loop-by-loop recomputation of the
SpecPrune rules from the key mass the plan received.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

import vla_accel
from vla_accel.model.llama import keep_tokens
from vla_accel.prune.plan import PrunePlan

from test_prune_model import INSTRUCTIONS, make_obs, specprune_cfg

READS = {"cpu", "item", "tolist", "numpy", "__int__", "__bool__", "__float__", "__index__", "__array__",
         "equal", "__repr__", "__format__", "nonzero", "pin_memory"}


class Dev(torch.Tensor):
    """A tensor that would live on the executor's (CUDA) device."""

    log: list | None = None  # (kind, name) events while recording

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        log = Dev.log
        is_read = False
        if log is not None:
            flat = list(args) + list(kwargs.values())
            flat += [x for a in flat if isinstance(a, (list, tuple)) for x in a]
            tensors = [a for a in flat if isinstance(a, torch.Tensor)]
            to_host = name == "to" and any(
                (isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu") for a in flat[1:])
            is_read = name in READS or to_host
            if is_read:
                log.append(("read", name))
            elif any(not isinstance(t, Dev) and t.dim() > 0 for t in tensors) \
                    and any(isinstance(t, Dev) for t in tensors) and name not in ("__get__", "__set__"):
                log.append(("mixed", name))
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if is_read:  # what comes back lives on the host
            return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out
        return _wrap(out)


def _wrap(x):
    if isinstance(x, torch.Tensor) and not isinstance(x, Dev):
        return x.as_subclass(Dev)
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _unwrap(x):
    if isinstance(x, Dev):
        return x.as_subclass(torch.Tensor)
    if isinstance(x, tuple):
        return tuple(_unwrap(v) for v in x)
    return x


@contextlib.contextmanager
def device_traffic():
    """Inside: PrunePlan's PruneDecisions methods get the executor's key mass as a Dev tensor and must hand back
    host data only (numpy: Keep, Rows). Yields the event log [(kind, name)]; a tensor coming back is logged as
    ("returned", name)."""
    log: list = []
    orig = {n: getattr(PrunePlan, n) for n in ("keep", "rows", "scores")}

    def traced(name, f):
        def g(self, i, *args):
            Dev.log = log
            try:
                out = f(self, i, *(_wrap(a) for a in args))
            finally:
                Dev.log = None
            fields = [] if out is None else [getattr(out, k) for k in vars(out)]
            if any(isinstance(x, torch.Tensor) for x in fields):
                log.append(("returned", name))
            return out
        return g

    for n, f in orig.items():
        setattr(PrunePlan, n, traced(n, f))
    try:
        yield log
    finally:
        for n, f in orig.items():
            setattr(PrunePlan, n, f)


@pytest.fixture(scope="module")
def policy():
    return vla_accel.random_policy("tiny", seed=3)


def test_the_counter_sees_syncs():
    """The instrument itself: it must catch the reads it claims to catch (else the counts below prove nothing)."""
    log: list = []
    Dev.log = log
    try:
        x = torch.arange(6.0).as_subclass(Dev)
        y = (x * 2).sum(0)
        assert isinstance(y, Dev) and log == []
        int(y), x.cpu(), x.tolist(), bool((x > 1).any()), torch.equal(x, x), x.to("cpu")
        assert [n for k, n in log if k == "read"] == ["__int__", "cpu", "tolist", "__bool__", "equal", "to"]
        _ = x + torch.ones(6)  # a host tensor mixed into device math
        assert log[-1][0] == "mixed"
    finally:
        Dev.log = None


def _forward(policy, batch, executor=None, seed=0, steps=1):
    from vla_accel.prune import SpecPrune

    if executor is not None:
        from vla_accel.runtime import make_executor

        policy = make_executor(policy, {"name": executor, "on_cpu": "emulate"} if executor == "accel" else
                               {"name": executor})
    actor = SpecPrune(policy, specprune_cfg())
    actor.reset(list(range(batch)))
    for t in range(steps):
        obs = [make_obs(seed + 10 * t + b) for b in range(batch)]
        for st in actor.streams.values():
            st.queue.clear()
        actor.act_batch(obs, [INSTRUCTIONS[b % 2] for b in range(batch)], list(range(batch)))
    return actor


@pytest.mark.parametrize("batch", [1, 3])
def test_one_device_read_per_score_layer(policy, batch):
    """Per forward: exactly one device -> host read per score layer (the key mass the decisions need); none at
    the prune layers (counts and indices are known on the host), no host/device mixing, only host data back."""
    with device_traffic() as log:
        actor = _forward(policy, batch)
    plan = actor.last_plan
    reads = [n for k, n in log if k == "read"]
    assert [n for k, n in log if k in ("mixed", "returned")] == []
    assert len(plan.score_layers) == 3 and len(plan.prune_layers) == 7
    assert reads == ["cpu"] * len(plan.score_layers), reads
    assert plan.host_reads == len(plan.score_layers)  # and they all went through the plan's one helper
    assert plan.summary()[0]["kept_per_layer"][-1] < plan.summary()[0]["kept_per_layer"][0]  # it did prune


# ---------------------------------------------------------------------------- independent recomputation
def _ref_ranks(values: list[float]) -> list[int]:
    """rank of each entry, 0 = highest; ties: lower index first (python's sort is stable)."""
    order = sorted(range(len(values)), key=lambda j: -values[j])
    r = [0] * len(values)
    for k, j in enumerate(order):
        r[j] = k
    return r


def reference_decisions(plan: PrunePlan, mass: dict[int, torch.Tensor], kept_pos: dict[int, torch.Tensor]):
    """The SpecPrune rules re-derived sample by sample, slot by slot, with python lists, from the key mass
    [B, S] the plan received at each score layer (and the token positions it saw there). -> {layer: [set of
    kept visual slots per sample]}. Importance in float32 like the plan (the ranking depends on its rounding)."""
    d, s = plan.dynamic, plan.static
    C, n_vis, L = plan.dims.num_images, plan.dims.n_vis, plan.dims.num_layers
    per = n_vis // C
    B = plan.B
    out = {}
    present = [set(range(n_vis)) for _ in range(B)]
    imp = [[np.float32(0.0)] * n_vis for _ in range(B)]
    local_union = [set() for _ in range(B)]
    f32 = np.float32
    for i in range(L):
        if i in plan.score_layers:
            pos = kept_pos[i]
            for b in range(B):
                # visual scores by slot, from the positions the tokens carry
                sc = {}
                for j in range(pos.shape[1]):
                    p = int(pos[b, j])
                    if 1 <= p <= n_vis and (p - 1) in present[b] and p - 1 not in sc:
                        sc[p - 1] = float(mass[i][b, j])
                full = [sc.get(v, -math.inf) for v in range(n_vis)]
                cams = [full[c * per:(c + 1) * per] for c in range(C)]
                ranks = [_ref_ranks(cv) for cv in cams]
                if i in plan.importance_layers:
                    lw = f32(1.0 / (1.0 + math.exp(-d.depth_sharpness * (L - i))))
                    for c in range(C):
                        n = sum(1 for v in range(c * per, (c + 1) * per) if v in present[b])
                        for k in range(per):
                            v = c * per + k
                            if v not in present[b]:
                                continue
                            w = f32(d.rank_weight_max) - f32(d.rank_weight_max - d.rank_weight_min) * \
                                f32(ranks[c][k]) / f32(max(n - 1, 1))
                            target = f32(w) * lw
                            imp[b][v] = f32(imp[b][v] + f32(d.ema_alpha) * f32(target - imp[b][v]))
                if i in plan.static_layers:
                    last = i == plan.static_layers[-1]
                    K = [int(x) for x in plan.k_local[b]]
                    top = {c * per + k for c in range(C) for k in range(per)
                           if ranks[c][k] < K[c] and full[c * per + k] > -math.inf}
                    if last:
                        local_union[b] |= top
                        local = set(local_union[b])
                    else:
                        wide = {c * per + k for c in range(C) for k in range(per)
                                if ranks[c][k] < K[c] * s.first_factor and full[c * per + k] > -math.inf}
                        local = wide | local_union[b]
                        local_union[b] |= top
                    changed = set()
                    if plan.similarity is not None:
                        for c in range(C):
                            sim = [float(plan.similarity[b, c * per + k]) for k in range(per)]
                            static = [k for k in range(per) if sim[k] >= s.changed.sim_threshold]
                            n_exempt = max(len(static) - int(plan.max_static[b, c]), 0)
                            # least similar first, then most attended, then lower slot
                            by = sorted(static, key=lambda k: (sim[k], ranks[c][k]))
                            changed |= {c * per + k for k in range(per) if sim[k] < s.changed.sim_threshold}
                            changed |= {c * per + k for k in by[:n_exempt]}
                    glob = {v for v in range(n_vis) if bool(plan.global_prev[b, v])}
                    keep = present[b] & (changed | glob | local)
                    out.setdefault(i, [None] * B)[b] = keep
        if i in plan.dynamic_layers:
            for b in range(B):
                n = len(present[b])
                k = min(n, max(d.min_visual, math.floor(n * d.keep_ratio)))
                order = sorted(sorted(present[b]), key=lambda v: -float(imp[b][v]))
                out.setdefault(i, [None] * B)[b] = set(order[:k])
        if i in out:
            for b in range(B):
                present[b] = present[b] & out[i][b]
    return out


@pytest.mark.parametrize("batch,executor", [(1, "reference"), (3, "reference"), (2, "accel")])
def test_kept_sets_match_an_independent_recomputation(batch, executor):
    pol = vla_accel.random_policy("tiny", device="cpu", dtype=torch.float32, seed=3)
    seen: dict = {}
    orig = PrunePlan.scores

    def spy(self, i, key_mass):  # the key mass the executor handed over, and the positions it held then
        seen.setdefault(id(self), {})[i] = (key_mass.detach().clone().cpu(), positions_at(self, i))
        return orig(self, i, key_mass)

    PrunePlan.scores = spy
    try:
        actor = _forward(pol, batch, executor=executor, seed=7, steps=2)  # step 2: global rule from history
    finally:
        PrunePlan.scores = orig
    plan = actor.last_plan
    rec = seen[id(plan)]
    want = reference_decisions(plan, {i: m for i, (m, _) in rec.items()}, {i: p for i, (_, p) in rec.items()})
    assert sorted(want) == plan.prune_layers
    present = torch.ones(batch, plan.dims.n_vis, dtype=torch.bool)
    for layer in plan.prune_layers:
        for b in range(batch):
            got = set(torch.nonzero(plan.keep_visual[layer][b] & present[b]).flatten().tolist())
            assert got == want[layer][b], (layer, b)
        present &= plan.keep_visual[layer]
        # and the executor really got those tokens: original positions entering the next layer
        pos = positions_at(plan, layer + 1)  # (padding: position 0, not visual)
        for b in range(batch):
            vis = [int(x) - 1 for x in pos[b] if 1 <= int(x) <= plan.dims.n_vis]
            assert vis == torch.nonzero(present[b]).flatten().tolist()  # ascending, exactly the kept slots


def positions_at(plan: PrunePlan, i: int) -> torch.Tensor:
    """[B, S_i] original positions of the tokens entering layer i (padding 0): the latest Keep, else the unpruned
    sequence."""
    prior = [j for j in plan.kept if j <= i]
    if prior:
        return torch.from_numpy(plan.kept[max(prior)].positions)
    S = int(plan.nv_count.max()) + 1 + plan.dims.n_vis
    return torch.arange(S)[None].expand(plan.B, S)


# ---------------------------------------------------------------------------- the plan driven directly
def _drive(plan: PrunePlan, lens, mass_fn):
    """A minimal executor: h carries each token's position; key mass from mass_fn(layer, positions, mask)."""
    B = len(lens)
    total = torch.as_tensor(lens) + plan.dims.n_vis + 1 + plan.dims.num_tail  # BOS+prompt[1:], vis, proprio, tail
    S = int(total.max())
    positions = torch.arange(S)[None].expand(B, S)
    key_mask = positions < total[:, None]
    h = positions[..., None].float().expand(B, S, 4).clone()
    masses, seen_pos = {}, {}
    for i in range(plan.dims.num_layers):  # the padded layout, as the reference applies the decisions
        keep = plan.keep(i)
        if keep is not None:
            h, positions, key_mask = keep_tokens(h, keep)
        assert torch.equal(h[..., 0].long() if key_mask is None else h[..., 0].long()[key_mask],
                           positions if key_mask is None else positions[key_mask])
        if plan.rows(i) is not None:
            m = mass_fn(i, positions, key_mask)
            masses[i], seen_pos[i] = m.clone(), positions.clone()
            plan.scores(i, m)
            if i in plan.importance_layers and i not in plan.static_layers:
                assert plan._pending is not None  # read, folded in later
    return masses, seen_pos


@pytest.mark.parametrize("seed", range(6))
def test_random_ties_match_the_recomputation(seed):
    """Coarse (tie-heavy) random key mass, random similarity / history / budgets, ragged prompts: the plan's
    decisions == the independent recomputation at every prune layer; one read per score layer."""
    from vla_accel.prune.config import LayerSchedule
    from vla_accel.prune.plan import Dims

    cfg = specprune_cfg()
    g = torch.Generator().manual_seed(seed)
    dims = Dims(num_layers=8, hidden=4, intermediate=8)
    sched = LayerSchedule(static_layers=(0, 1), score_layers=(0, 1, 3), dynamic_layers=(2, 3, 4, 5, 6))
    B = 3
    lens = torch.randint(4, 12, (B,), generator=g)
    sim = torch.where(torch.rand(B, 512, generator=g) < 0.7, torch.tensor(0.99), torch.rand(B, 512, generator=g))
    sim = (sim * 8).round() / 8  # ties in similarity too
    plan = PrunePlan(dims, sched, static=cfg.static, dynamic=cfg.dynamic, prompt_lens=lens,
                     k_local=torch.randint(0, 30, (B, 2), generator=g), similarity=sim,
                     max_static=torch.randint(100, 256, (B, 2), generator=g),
                     global_prev=torch.rand(B, 512, generator=g) < 0.05)
    levels = 3 + seed  # few distinct values: many ties

    def mass_fn(i, positions, key_mask):
        m = torch.randint(0, levels, positions.shape, generator=g).float() / levels
        return m if key_mask is None else m * key_mask

    masses, seen_pos = _drive(plan, lens, mass_fn)
    want = reference_decisions(plan, masses, seen_pos)
    present = torch.ones(B, 512, dtype=torch.bool)
    for layer in plan.prune_layers:
        for b in range(B):
            assert set(torch.nonzero(plan.keep_visual[layer][b] & present[b]).flatten().tolist()) == want[layer][b]
        present &= plan.keep_visual[layer]
    assert plan.host_reads == len(plan.score_layers)
    s = plan.summary()
    assert [x["kept_per_layer"][-1] for x in s] == (1 + present.sum(1) + lens + dims.num_tail).tolist()
