"""The policy object: observation + instruction in, env-ready 8x7 action chunk out.

    policy.predict(obs, instruction) -> np.ndarray [8, 7]
    policy.predict_batch([obs, ...], [instruction, ...]) -> np.ndarray [B, 8, 7]
    policy.predict_from_inputs(input_ids, pixel_values, proprio) -> (normalized [B, 8, 7], hidden [B, 56, H])

`obs` = {"full_image": uint8 [H, W, 3] upright, "wrist_image": uint8 [H, W, 3] upright, "state": (8,) raw}.

`ChunkedActor(policy)` executes chunks open loop, one queue per stream (env), and queries the
policy once per step for all streams whose queue is empty (one batched forward).

The forward is the policy's executor (vla_accel.protocols.Executor): the plain model by default, or another one
passed in: `policy.with_executor(runner)` (vla_accel.runtime.make_executor builds the accelerated one).
"""

from __future__ import annotations

import copy
import functools
import time
from collections import deque
from typing import Any, Sequence

import numpy as np
import torch

from . import processing as P
from ._device import to_device_async
from .model.oft import OpenVLAOFT
from .protocols import Executor, PruneDecisions
from .tokenizer import tokenize_prompt, with_empty_token

Obs = dict[str, Any]


def resolve_unnorm_key(stats: dict, key: str | None) -> str:
    """The dataset-statistics key: the given one, else `{key}_no_noops`, else the only one."""
    names = sorted(stats)
    if not names:
        raise ValueError("the checkpoint has no dataset statistics (dataset_statistics.json / norm_stats is empty)")
    if key is None:
        if len(names) == 1:
            return names[0]
        raise ValueError(f"this checkpoint has statistics for several datasets; pass unnorm_key=one of {names} "
                         f"(a suite name such as 'libero_spatial' also selects 'libero_spatial_no_noops')")
    for k in (key, f"{key}_no_noops"):
        if k in stats:
            return k
    raise ValueError(f"unknown unnorm_key '{key}'; available: {names}")


class Policy:
    def __init__(self, model: OpenVLAOFT, *, norm_stats: dict, unnorm_key: str | None = None,
                 image_norm: P.ImageNorm | None = None, tokenizer=None, random_weights: bool = False,
                 source: str | None = None, center_crop: bool = True, jpeg: bool = True,
                 executor: Executor | None = None):
        self.model = model.eval()
        self.cfg = model.cfg
        self.norm_stats = norm_stats
        self.unnorm_key = resolve_unnorm_key(norm_stats, unnorm_key)
        stats = norm_stats[self.unnorm_key]
        for part in ("action", "proprio"):
            if part not in stats or "q01" not in stats[part] or "q99" not in stats[part]:
                raise ValueError(f"statistics '{self.unnorm_key}' lack '{part}' q01/q99 (bounds_q99 normalization)")
        self.action_stats, self.proprio_stats = stats["action"], stats["proprio"]
        self.image_norm = image_norm or P.ImageNorm()
        self.tokenizer = tokenizer
        self.random_weights = random_weights
        self.source = source
        self.center_crop, self.jpeg = center_crop, jpeg
        self.prep_threads = P.default_prep_threads()  # a batch's images are prepared on this many threads
        self.executor: Executor = executor if executor is not None else self.model  # the forward (model: reference)
        self.last_stats: dict[str, Any] = {}

    def with_executor(self, executor: Executor) -> "Policy":
        """A policy sharing everything with this one (model, statistics, tokenizer, pre-processing) whose forward
        is `executor`; this one is left as it is."""
        other = copy.copy(self)
        other.executor, other.last_stats = executor, {}
        return other

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def describe(self) -> dict[str, Any]:
        """The policy, and its executor's own description: "executor" (its name) and, beyond the name, what it
        resolved ("runtime")."""
        ex = self.executor.describe()
        out = {
            "name": "openvla-oft", "source": self.source, "random_weights": self.random_weights,
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "unnorm_key": self.unnorm_key, "executor": ex["executor"],
            "tokenizer": getattr(self.tokenizer, "name", type(self.tokenizer).__name__),
            "llm_layers": self.cfg.llm.layers, "llm_hidden": self.cfg.llm.hidden,
        }
        details = {k: v for k, v in ex.items() if k not in ("executor", "graphs")}
        if details:
            out["runtime"] = details
        return out

    # ------------------------------------------------------------------ pre-processing
    @property
    def image_spec(self) -> tuple[int, bool, bool]:
        """(size, center_crop, jpeg): the arguments of processing.prepare_image for this policy."""
        return self.cfg.image_size, self.center_crop, self.jpeg

    def image_prep(self):
        """A picklable obs -> obs that adds this policy's model-input images (processing.attach_model_images), for
        the process that makes the observations; prepare() then uses them instead of computing them."""
        return functools.partial(P.attach_model_images, spec=self.image_spec)

    def prepare(self, obs_list: Sequence[Obs], instructions: Sequence[str]):
        """-> (prompt id lists, pixel_values [B, 12, 224, 224], proprio [B, 8] normalized)."""
        if isinstance(instructions, str):
            raise TypeError("predict_batch takes a list of instructions, one per observation")
        if len(obs_list) != len(instructions):
            raise ValueError(f"{len(obs_list)} observations but {len(instructions)} instructions")
        if len(obs_list) == 0:
            raise ValueError("empty batch")
        if self.tokenizer is None:
            raise RuntimeError("this policy has no tokenizer; use predict_from_inputs() with token ids")
        n_img, size = self.cfg.num_images, self.cfg.image_size
        pixels = np.empty((len(obs_list), 6 * n_img, size, size), np.float32)  # filled in place, one copy fewer
        ids, props, carried, raw = [], [], [], []
        for obs, text in zip(obs_list, instructions):
            if not isinstance(obs, dict):
                raise TypeError(f"obs must be a dict with full_image, wrist_image, state; got {type(obs).__name__}")
            missing = [k for k in ("full_image", "wrist_image", "state") if k not in obs]
            if missing:
                raise KeyError(f"obs lacks {missing}; expected keys full_image, wrist_image (uint8 [H, W, 3]), "
                               "state (8,)")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"instruction must be a non-empty string, got {text!r}")
            carried.append(P.model_images(obs, self.image_spec))  # prepared where the observation was made
            if carried[-1] is None:
                raw += [P.check_image(obs[k], k) for k in ("full_image", "wrist_image")]
            state = P.check_state(obs["state"], self.cfg.proprio_dim)
            props.append(P.normalize_proprio(state, self.proprio_stats))
            ids.append(tokenize_prompt(self.tokenizer, text))
        prepared = iter(P.prepare_images(raw, size, self.center_crop, self.jpeg, self.prep_threads))
        for b, imgs in enumerate(carried):
            P.to_pixel_values(imgs or [next(prepared), next(prepared)], self.image_norm, out=pixels[b])
        return ids, torch.from_numpy(pixels), torch.tensor(np.stack(props), dtype=torch.float32)

    def postprocess(self, normalized: np.ndarray) -> np.ndarray:
        """normalized [..., 7] -> env-ready actions (un-normalized, gripper converted)."""
        return P.gripper_to_env(P.unnormalize_actions(normalized, self.action_stats))

    # ------------------------------------------------------------------ inference
    def batch_ids(self, input_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt ids (tensor [B, P] or list of lists) -> right-padded ids with 29871 appended, lengths."""
        if isinstance(input_ids, torch.Tensor):
            if input_ids.ndim == 1:
                input_ids = input_ids[None]
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be [B, P], got shape {tuple(input_ids.shape)}")
            input_ids = input_ids.tolist()
        rows = [with_empty_token(r, self.cfg.empty_id) for r in input_ids]
        if any(len(r) < 2 or r[0] != self.cfg.bos_id for r in rows):
            raise ValueError(f"each prompt must start with BOS ({self.cfg.bos_id}) and hold at least one token")
        vocab = self.cfg.llm.vocab
        if any(not 0 <= t < vocab for r in rows for t in r):
            raise ValueError(f"token ids must lie in [0, {vocab})")
        lens = torch.tensor([len(r) for r in rows])
        out = torch.full((len(rows), int(lens.max())), self.cfg.llm.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r)
        return out, lens

    @torch.inference_mode()
    def predict_from_inputs(self, input_ids, pixel_values, proprio, decisions: PruneDecisions | None = None):
        """input_ids: prompt ids as tokenized (BOS first, before 29871 / placeholders / stop), [B, P] or
        list of lists; pixel_values: [B, 12, 224, 224]; proprio: [B, 8] normalized; decisions: pruning (None: none).
        -> (normalized actions [B, 8, 7] fp32, action hidden states [B, 56, H])."""
        ids, lens = self.batch_ids(input_ids)
        B = ids.shape[0]
        n_img = self.cfg.num_images
        want = (B, 6 * n_img, self.cfg.image_size, self.cfg.image_size)
        if tuple(pixel_values.shape) != want:
            raise ValueError(f"pixel_values must have shape {want}, got {tuple(pixel_values.shape)}")
        if tuple(proprio.shape) != (B, self.cfg.proprio_dim):
            raise ValueError(f"proprio must have shape {(B, self.cfg.proprio_dim)}, got {tuple(proprio.shape)}")
        dev, dtype = self.device, self.dtype
        # inputs go over cast on the host (pixels: half the bytes) and asynchronously, from pinned memory
        ids, pixel_values, proprio = (to_device_async(x, dev, t) for x, t in
                                      ((ids, None), (pixel_values, dtype), (proprio, dtype)))
        return self.executor(ids, pixel_values, proprio, lens, decisions)  # (lengths stay on the host)

    def predict_batch(self, obs_list: Sequence[Obs], instructions: Sequence[str],
                      decisions: PruneDecisions | None = None) -> np.ndarray:
        t_prep = time.perf_counter()
        ids, pixels, props = self.prepare(obs_list, instructions)
        _, lens = self.batch_ids(ids)
        t0 = time.perf_counter()
        norm, _ = self.predict_from_inputs(ids, pixels, props, decisions=decisions)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t1 = time.perf_counter()
        chunks = self.postprocess(norm.cpu().numpy())
        # backbone tokens per sample: BOS + prompt[1:] + 512 patches + proprio + 56 placeholders + stop
        tokens = (lens + self.cfg.num_patch_tokens + self.cfg.num_action_tokens + 1).tolist()
        self.last_stats = {"latency_ms": (t1 - t0) * 1e3, "batch_size": len(ids), "tokens": tokens,
                           "prep_ms": (t0 - t_prep) * 1e3, "post_ms": (time.perf_counter() - t1) * 1e3}
        return chunks

    def predict(self, obs: Obs, instruction: str) -> np.ndarray:
        return self.predict_batch([obs], [instruction])[0]


class ChunkedActor:
    """Open-loop chunk execution, one action queue per stream; one batched forward per step."""

    def __init__(self, policy):
        self.policy = policy
        self.queues: dict[int, deque] = {}

    def describe(self) -> dict[str, Any]:
        return {**self.policy.describe(), "actor": "chunked", "prune": "none"}

    def reset(self, streams: Sequence[int]):
        for s in streams:
            self.queues[s] = deque()

    def image_prep(self):
        return self.policy.image_prep()

    def wants_prepared(self, stream: int) -> bool:
        """Will the next act_batch query this stream (its queue is empty), so its next observation's images are
        pre-processed? (An observation made elsewhere may carry them: processing.attach_model_images.)"""
        return not self.queues.get(stream)

    def act_batch(self, obs_list: Sequence[Obs], instructions: Sequence[str], streams: Sequence[int]):
        need = [i for i, s in enumerate(streams) if not self.queues.setdefault(s, deque())]
        infos = [{"queried": False, "latency_ms": None, "batch_size": None, "tokens_kept": None} for _ in streams]
        if need:
            chunks, q_infos = self._query([obs_list[i] for i in need], [instructions[i] for i in need])
            for j, i in enumerate(need):
                self.queues[streams[i]].extend(chunks[j])
                infos[i] = q_infos[j]
        actions = np.stack([self.queues[s].popleft() for s in streams])
        return actions, infos

    def chunk_batch(self, obs_list: Sequence[Obs], instructions: Sequence[str], streams: Sequence[int]):
        """One forward for every stream -> (chunks [N, 8, 7], infos); the clients run the chunks (queues emptied)."""
        if len(streams) != len(obs_list):
            raise ValueError(f"{len(obs_list)} observations but {len(streams)} streams")
        for s in streams:
            self.queues[s] = deque()
        return self._query(obs_list, instructions)

    def _query(self, obs_list: Sequence[Obs], instructions: Sequence[str]):
        chunks = self.policy.predict_batch(obs_list, instructions)
        st = self.policy.last_stats
        return chunks, [{"queried": True, "latency_ms": st["latency_ms"], "batch_size": len(chunks),
                         "tokens_kept": st["tokens"][j], "prep_ms": st["prep_ms"], "post_ms": st["post_ms"]}
                        for j in range(len(chunks))]
