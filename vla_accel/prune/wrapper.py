"""SpecPrune: the policy with SpecPrune-VLA pruning, as an actor (one stream per env) or a single-stream policy.

    actor = SpecPrune(policy, cfg)                     # cfg: SpecPruneConfig, dict or omegaconf node
    actor.reset([0, 1])                                # new episodes on streams 0 and 1
    actions, infos = actor.act_batch(obs_list, instructions, streams=[0, 1])   # actions [N, 7]
    chunks, infos = actor.chunk_batch(obs_list, instructions, streams=[0, 1])  # chunks [N, 8, 7], run open loop
    chunk = actor.predict(obs, instruction)            # [8, 7], stream 0; actor.reset() between episodes

Per stream it holds the frame history (for changed patches), the previous inference's top tokens (global
rule), the controller mode and the action queue. One batched forward serves every stream whose queue is
empty; the forward is `policy.predict_from_inputs(..., decisions=plan)`: the policy's executor (the plain model or
the accelerated runner) applies the plan's decisions (vla_accel.protocols.PruneDecisions).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Sequence

import numpy as np
import torch

from .. import processing as P
from .changed import frame_gap, patch_similarity
from .config import SpecPruneConfig
from .controller import ActionController
from .overlay import overlay_pair
from .plan import Dims, PrunePlan, plan_for_batch


class Frame:
    """One step's camera images: raw (as observed) and, once needed, the 224x224 model inputs."""

    __slots__ = ("raw", "model")

    def __init__(self, obs: dict, spec: tuple | None = None):
        missing = [k for k in ("full_image", "wrist_image") if not isinstance(obs, dict) or k not in obs]
        if missing:
            raise KeyError(f"obs lacks {missing}; expected keys full_image, wrist_image (uint8 [H, W, 3]), state (8,)")
        self.raw = (np.array(obs["full_image"], copy=True), np.array(obs["wrist_image"], copy=True))
        # the model inputs when the observation carries them for this spec (prepared where it was made)
        self.model: list[np.ndarray] | None = P.model_images(obs, spec) if spec is not None else None


class StreamState:
    def __init__(self, cfg: SpecPruneConfig):
        self.queue: deque = deque()
        ch = cfg.static.changed
        self.frames: deque[Frame] = deque(maxlen=max(ch.gap_max, ch.gap_fixed or 0))
        self.moved = np.zeros(3)  # summed executed xyz since the last query
        self.controller = ActionController(cfg.controller)
        self.global_prev: np.ndarray | None = None  # bool [n_vis]: previous inference's top tokens
        self.replan = False  # the queue was flushed by the controller since the last query
        self.last: dict[str, Any] | None = None  # the last query's token fates (overlays)


class SpecPrune:
    def __init__(self, policy, cfg: Any = None):
        self.policy = policy
        self.cfg = cfg if isinstance(cfg, SpecPruneConfig) else SpecPruneConfig.from_dict(cfg or {})
        m = policy.cfg
        self.schedule = self.cfg.resolve(m.llm.layers, m.patches_per_image, m.num_images)
        self.dims = Dims(num_layers=m.llm.layers, hidden=m.llm.hidden, intermediate=m.llm.intermediate,
                         num_images=m.num_images, patches_per_image=m.patches_per_image,
                         num_tail=m.num_action_tokens + 1)
        self.patch = m.towers[0].patch
        self.streams: dict[int, StreamState] = {}
        self.last_plan: PrunePlan | None = None  # the plan of the latest forward (decisions, scores)
        self.last_info: dict[str, Any] | None = None  # predict()'s info of the latest query

    # ------------------------------------------------------------------ actor API
    def describe(self) -> dict[str, Any]:
        s = self.schedule
        return {**self.policy.describe(), "actor": "specprune", "prune": self.cfg.name,
                "prune_cfg": self.cfg.to_dict(),
                "prune_layers": {"static": list(s.static_layers) if self.cfg.static.enabled else [],
                                 "score": list(s.score_layers) if self.cfg.dynamic.enabled else [],
                                 "dynamic": list(s.dynamic_layers) if self.cfg.dynamic.enabled else []}}

    def reset(self, streams: Sequence[int] | None = None) -> None:
        """New episodes on `streams` (None: every stream, as single-stream use expects)."""
        if streams is None:
            self.streams.clear()
            return
        for s in streams:
            self.streams[s] = StreamState(self.cfg)

    def image_prep(self):
        return self.policy.image_prep()

    def wants_prepared(self, stream: int) -> bool:
        """Will the next observation of this stream need its model-input images: the next query's frame (queue
        empty) or a frame that query may compare with (within the largest frame gap before it)?"""
        st = self.streams.get(stream)
        ch = self.cfg.static.changed
        return st is None or len(st.queue) < max(ch.gap_max, ch.gap_fixed or 0)

    def state(self, stream: int) -> StreamState:
        if stream not in self.streams:
            self.streams[stream] = StreamState(self.cfg)
        return self.streams[stream]

    def act_batch(self, obs_list: Sequence[dict], instructions: Sequence[str], streams: Sequence[int],
                  executed: np.ndarray | None = None):
        """-> (actions [N, 7], infos). `executed` [N, 7]: the actions the envs really ran, when they are not the
        returned ones (replaying a recorded trace); the controller and the frame gap use them."""
        if not (len(obs_list) == len(instructions) == len(streams)):
            raise ValueError(f"{len(obs_list)} observations, {len(instructions)} instructions, {len(streams)} streams")
        want = (len(streams), self.policy.cfg.action_dim)
        if executed is not None and np.shape(executed) != want:
            raise ValueError(f"executed must have shape {want} (one action per stream), got {np.shape(executed)}")
        states = [self.state(s) for s in streams]
        for st, obs in zip(states, obs_list):
            st.frames.append(Frame(obs, getattr(self.policy, "image_spec", None)))
        need = [i for i, st in enumerate(states) if not st.queue]
        infos: list[dict[str, Any]] = [{"queried": False, "latency_ms": None, "batch_size": None, "tokens_kept": None}
                                       for _ in streams]
        if need:
            chunks, q_infos = self._query([obs_list[i] for i in need], [instructions[i] for i in need],
                                          [states[i] for i in need])
            for j, i in enumerate(need):
                states[i].queue.extend(chunks[j])
                infos[i] = q_infos[j]
        actions = np.stack([st.queue.popleft() for st in states])
        ran = actions if executed is None else np.asarray(executed, dtype=np.float64)
        for i, st in enumerate(states):
            st.moved += ran[i, :3]
            flush = st.controller.observe(ran[i], queue_empty=not st.queue)
            if flush:
                st.queue.clear()
                st.replan = True
            infos[i]["flushed"] = flush
        return actions, infos

    def chunk_batch(self, obs_list: Sequence[dict], instructions: Sequence[str], streams: Sequence[int]):
        """One pruned forward for every stream -> (chunks [N, 8, 7], infos); each chunk is assumed executed whole
        and in order (its client runs it open loop): the controller and the frame gap see its actions.

        Only the frames given here enter the history, so the changed-patch rule compares with earlier
        QUERY frames; use act_batch (called every step) for the reference's step-level frame gap."""
        if not (len(obs_list) == len(instructions) == len(streams)):
            raise ValueError(f"{len(obs_list)} observations, {len(instructions)} instructions, {len(streams)} streams")
        states = [self.state(s) for s in streams]
        for st, obs in zip(states, obs_list):
            st.frames.append(Frame(obs, getattr(self.policy, "image_spec", None)))
            st.queue.clear()
        chunks, infos = self._query(list(obs_list), list(instructions), states)
        for st, chunk in zip(states, chunks):
            for k, a in enumerate(chunk):
                st.moved += a[:3]
                st.controller.observe(a, queue_empty=k == len(chunk) - 1)
        return chunks, infos

    def predict(self, obs: dict, instruction: str) -> np.ndarray:
        """Single stream (0): chunk_batch for one observation -> the [8, 7] chunk."""
        chunks, infos = self.chunk_batch([obs], [instruction], [0])
        self.last_info = infos[0]
        return chunks[0]

    # ------------------------------------------------------------------ one batched forward
    def _model_images(self, pixel_values: torch.Tensor) -> np.ndarray:
        """pixel_values [B, 6n, 224, 224] -> the uint8 model-input images [B, n, 224, 224, 3] (exact: the SigLIP
        channels are x/255 normalized by mean/std, inverted and rounded)."""
        norm = self.policy.image_norm
        mean = torch.tensor(norm.means[1])[:, None, None]
        std = torch.tensor(norm.stds[1])[:, None, None]
        n = pixel_values.shape[1] // 6
        imgs = []
        for c in range(n):
            x = pixel_values[:, 6 * c + 3:6 * c + 6].float().cpu() * std + mean  # [B, 3, H, W] in [0, 1]
            imgs.append((x * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
        return torch.stack(imgs, 1).numpy()

    def _earlier(self, st: StreamState) -> tuple[Frame, int]:
        """-> (the frame T back that the current one is compared with, T)."""
        ch = self.cfg.static.changed
        T = ch.gap_fixed or frame_gap(float(np.linalg.norm(st.moved)), ch.gap_min, ch.gap_max)
        return (st.frames[-T] if len(st.frames) >= T else st.frames[0]), T  # episode start: the oldest frame kept

    def _prepare_frames(self, frames: list[Frame]) -> None:
        """The model-input images of frames that lack them, all in one parallel call (processing.prepare_images)."""
        todo = list({id(f): f for f in frames if f.model is None}.values())
        if todo:
            p = self.policy
            imgs = P.prepare_images([img for f in todo for img in f.raw], *p.image_spec, getattr(p, "prep_threads", 1))
            for i, f in enumerate(todo):
                f.model = imgs[2 * i:2 * i + 2]

    def _similarity(self, cur: Frame, earlier: Frame) -> np.ndarray:
        """Patch similarity [n_vis] of the current frame to the earlier one (both with their model images)."""
        return np.concatenate([patch_similarity(a, b, self.patch) for a, b in zip(cur.model, earlier.model)])

    def _query(self, obs_list, instructions, states: list[StreamState]):
        policy, cfg = self.policy, self.cfg
        t_prep = time.perf_counter()
        ids, pixels, props = policy.prepare(obs_list, instructions)
        _, lens = policy.batch_ids(ids)
        images = self._model_images(pixels)  # [B, 2, 224, 224, 3]
        B, n_vis, C = len(states), self.dims.n_vis, self.dims.num_images
        ch = cfg.static.changed
        use_sim = cfg.static.enabled and ch.enabled
        similarity = np.ones((B, n_vis)) if use_sim else None
        max_static = np.zeros((B, C), dtype=np.int64)
        global_prev = np.zeros((B, n_vis), dtype=bool)
        k_local = np.zeros((B, C), dtype=np.int64)
        extra = []
        for b, st in enumerate(states):
            st.frames[-1].model = list(images[b])
        # the frames the current ones are compared with, and their model images in one parallel call (the current
        # frames' come from the pixels)
        earlier = [self._earlier(st) for st in states] if use_sim else []
        self._prepare_frames([f for f, _ in earlier])
        for b, st in enumerate(states):
            fine = st.controller.fine
            gap, n_static = 0, None
            if cfg.static.enabled:
                k_local[b] = cfg.static.topk_fine if fine else cfg.static.topk
                max_static[b] = ch.max_static_fine if fine else ch.max_static
                if st.global_prev is not None:
                    global_prev[b] = st.global_prev
            if use_sim:
                frame, gap = earlier[b]
                similarity[b] = self._similarity(st.frames[-1], frame)
                n_static = (similarity[b] >= ch.sim_threshold).reshape(C, -1).sum(1).tolist()
            extra.append({"mode": st.controller.mode, "replan": st.replan, "frame_gap": gap,
                          "static_patches": n_static})
            st.moved[:] = 0.0
            st.replan = False
        plan = plan_for_batch(cfg, self.schedule, self.dims, lens, k_local=k_local, similarity=similarity,
                              max_static=max_static, global_prev=global_prev)
        t0 = time.perf_counter()
        norm, _ = policy.predict_from_inputs(ids, pixels, props, decisions=plan)
        if policy.device.type == "cuda":
            torch.cuda.synchronize(policy.device)
        t1 = time.perf_counter()
        chunks = policy.postprocess(norm.cpu().numpy())
        self.last_plan = plan
        infos = []
        for b, (st, s) in enumerate(zip(states, plan.summary())):
            if cfg.static.enabled and cfg.static.global_topk and any(cfg.static.global_topk):
                st.global_prev = s["global_next"]
            st.last = {"images": images[b], "rules": s["rules"], "dropped_after": s["dropped_after"],
                       "static_layers": plan.static_layers, "mode": extra[b]["mode"]}
            infos.append({
                "queried": True, "latency_ms": (t1 - t0) * 1e3, "batch_size": B, "tokens_kept": s["tokens_kept"],
                **extra[b],
                "tokens_full": s["tokens_full"],
                "kept_per_camera": s["kept_per_camera"],
                "kept_static_per_camera": s["kept_static_per_camera"],
                "kept_per_layer": s["kept_per_layer"],
                "kept_by_rule": s["kept_by_rule"],
                "flops_ratio": round(s["flops_ratio"], 6),
                "gflops": round(s["flops"] / 1e9, 6),
                "gflops_full": round(s["flops_full"] / 1e9, 6),
            })
        post_ms = (time.perf_counter() - t1) * 1e3   # un-normalization and the plan's summary (host)
        for info in infos:
            info["prep_ms"], info["post_ms"] = (t0 - t_prep) * 1e3, post_ms
        return chunks, infos

    # ------------------------------------------------------------------ pictures
    def overlay_frame(self, stream: int = 0) -> np.ndarray | None:
        """uint8 [H, 2*224 + gap, 3]: the last query's model-input images of `stream` with the kept patches
        marked (see overlay.py), or None before the first query."""
        last = self.state(stream).last
        if last is None:
            return None
        return overlay_pair(last["images"], last["rules"], last["dropped_after"], last["static_layers"],
                            patch=self.patch, caption=f"mode {last['mode']}")
