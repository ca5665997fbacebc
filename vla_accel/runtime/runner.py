"""AccelRunner: the whole OpenVLA-OFT forward on packed token rows, pruning-aware, CUDA-graphed.

    runner = AccelRunner(policy.model, RuntimeConfig())
    actions, action_hidden = runner(input_ids, pixel_values, proprio, prompt_lens, decisions=plan)
    fast_policy = policy.with_executor(runner)

An Executor (vla_accel.protocols) with the results of `OpenVLAOFT.forward` (the plain model stays the reference).
What differs:
  - the batch is PACKED: T = sum of per-sample token counts rows [T, D] plus padding rows up to a token bucket;
    `cu_seqlens` [B+2] int32 marks the samples (and the padding rows, a sequence of their own). Samples with
    different kept counts (ragged batches from pruning) cost only their own tokens. The counts live on the host.
  - weights: QKV and gate/up concatenated once at build (one GEMM each), residual adds in the GEMM epilogue,
    RMSNorm / RoPE(+q/k split) / SiLU*up as one Triton pass each, varlen flash attention.
  - vision: both cameras in one batch, the two towers on two CUDA streams; the model's projector, proprio
    projector and action head modules themselves (in graphs).
  - graphs: vision (per B), backbone segments (per first/last layer, B, token bucket), head (per B).
  - last layer: O-proj, MLP and final norm only for the 56 action rows of each sample.

Pruning decisions (PruneDecisions) are applied on the packed rows: a Keep (host indices and positions) becomes one
gather of rows, its counts the new cu_seqlens; Rows become the attention kernel's row selection, built on the host.
Graph segments end at the decisions' score and prune layers. The key mass handed to `scores` may be a window on a
static buffer (the decisions copy what they keep); at a layer in `blocking_layers` it is a host tensor, copied
while the GPU runs the rest of the layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._device import copy_into_async, to_device_async, to_host_async
from ..model.llama import key_mass_from_rows, padding_bias, score_rows_on
from ..model.oft import OpenVLAOFT
from ..protocols import Keep, Rows
from .config import RuntimeConfig
from .fused import Ops, rope_table
from .graphs import GraphCache
from .weights import LayerWeights, fuse_backbone, layer_scale


# ---------------------------------------------------------------------------- layer segments
def segments(decisions, num_layers: int) -> list[tuple[int, int]]:
    """Layer ranges [a, b] run as one piece: pieces end at each score layer and prune layer of the decisions (the
    decisions read scores after a score layer and may drop tokens after a prune layer); none: the whole backbone."""
    if decisions is None:
        return [(0, num_layers - 1)]
    ends = {int(i) for i in list(decisions.score_layers) + list(decisions.prune_layers) if 0 <= int(i) < num_layers}
    out, a = [], 0
    for b in sorted(ends | {num_layers - 1}):
        out.append((a, b))
        a = b + 1
    return out


@dataclass
class State:
    """The packed batch between two pieces of the backbone."""

    B: int
    T: int  # real rows (host)
    T_pad: int  # rows incl. padding (= T when eager)
    graphed: bool
    h: torch.Tensor  # [T_pad, D]
    pos: torch.Tensor  # [T_pad] int64 RoPE positions
    cu: torch.Tensor  # [B+2] int32: samples, then the padding rows
    counts: np.ndarray  # [B] rows per sample (host)
    sel: torch.Tensor  # [T_pad] bool score rows (kernel key-mass path)

    @property
    def S(self) -> int:  # the longest sample
        return int(self.counts.max())

    @property
    def starts(self) -> np.ndarray:  # [B] first packed row of each sample (host)
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]])

    @property
    def uniform(self) -> bool:  # every sample has S rows: the packed rows are a [B, S] view
        return bool((self.counts == self.counts[0]).all())


class AccelRunner:
    def __init__(self, model: OpenVLAOFT, cfg: RuntimeConfig | dict | None = None):
        cfg = cfg if isinstance(cfg, RuntimeConfig) else RuntimeConfig.from_dict(cfg or {})
        self.model, self.cfg = model.eval(), cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if cfg.dtype != "auto" and getattr(torch, cfg.dtype) != self.dtype:
            raise ValueError(f"runtime.dtype={cfg.dtype} but the policy's weights are {self.dtype}; load the policy "
                             f"in {cfg.dtype} (policy.dtype) or set runtime.dtype=auto")
        cuda = self.device.type == "cuda"
        if not cuda and cfg.on_cpu == "error":
            raise RuntimeError("the accelerated runtime needs a CUDA GPU (runtime.on_cpu=error); use runtime=reference "
                               "on CPU, or runtime.on_cpu=emulate / eager for tests")
        self.mode = "cuda" if cuda else cfg.on_cpu  # cuda | emulate | eager
        if not cfg.graphs:
            self.mode = "eager"
        self.ops = Ops(cfg, self.device, self.dtype)
        self.vision_attn = {"sdpa": "sdpa_dense" if cuda else "sdpa"}.get(self.ops.vision_attn, self.ops.vision_attn)
        if cuda and cfg.vision_attention == "auto":
            # torch SDPA on the dense [2B, H, S, d] view (cuDNN on an H100): 9.5 us per DINOv2 / SigLIP block at
            # B = 1 against 11.8 / 12.5 us for FA2 varlen (benchmarks/profile_step.py, 2026-11-24)
            self.vision_attn = "sdpa_dense"
        m = model.cfg
        self.mcfg, self.L = m, m.llm.layers
        self.D, self.H = m.llm.hidden, m.llm.heads
        self.A = m.num_action_tokens
        self.eps = m.llm.rms_eps
        self.layers: list[LayerWeights] = fuse_backbone(model.llm, share=cfg.share_weights)
        if cuda and cfg.share_weights:
            torch.cuda.empty_cache()  # hand back the blocks of the separate q/k/v, gate/up tensors just replaced
        self.cos, self.sin = rope_table(max(m.llm.max_positions, 2048), m.llm.head_dim, m.llm.rope_theta, self.dtype,
                                        self.device)
        self.graphs = GraphCache(self.device, mode="cuda" if self.mode == "cuda" else "emulate",
                                 max_graphs=cfg.max_graphs, capture_fallback=cfg.capture_fallback) \
            if self.mode != "eager" else None
        self._buffers: dict[tuple, dict] = {}
        self._layouts: dict[tuple, tuple] = {}
        self._side = torch.cuda.Stream(self.device) if cuda and cfg.vision_streams else None
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None  # early key-mass reads
        self.last_stats: dict[str, Any] = {}
        self.calls = 0

    # ------------------------------------------------------------------ info
    def describe(self) -> dict:
        return {"executor": "accel" if self.mode == "cuda" else f"accel-{self.mode}-cpu", "mode": self.mode,
                "config": self.cfg.to_dict(), "ops": self.ops.describe(), "vision_attention": self.vision_attn,
                "graphs": self.graphs.stats() if self.graphs is not None else None}

    def bucket(self, B: int, T: int) -> tuple[int, bool]:
        """(padded rows, graphed?) for B samples holding T rows."""
        if self.graphs is None or B not in self.cfg.batch_sizes:
            return T, False
        t = self.cfg.bucket(T)
        return (T, False) if t is None else (t, True)

    def _buf(self, B: int, T_pad: int) -> dict:
        key = (B, T_pad)
        if key not in self._buffers:
            dev = self.device
            self._buffers[key] = {
                "h": torch.zeros(T_pad, self.D, dtype=self.dtype, device=dev),
                "pos": torch.zeros(T_pad, dtype=torch.long, device=dev),
                "cu": torch.zeros(B + 2, dtype=torch.int32, device=dev),
                "sel": torch.zeros(T_pad, dtype=torch.bool, device=dev),
            }
        return self._buffers[key]

    def _static(self, name: str, shape: tuple, dtype=None) -> torch.Tensor:
        key = (name, shape)
        if key not in self._buffers:
            self._buffers[key] = torch.zeros(shape, dtype=dtype or self.dtype, device=self.device)
        return self._buffers[key]

    # ------------------------------------------------------------------ forward
    def __call__(self, input_ids, pixel_values, proprio, prompt_lens=None, decisions=None):
        return self.forward(input_ids, pixel_values, proprio, prompt_lens=prompt_lens, decisions=decisions)

    @torch.inference_mode()
    def forward(self, input_ids, pixel_values, proprio, prompt_lens=None, decisions=None):
        """prompt_lens [B] on the host (None: every prompt fills input_ids); decisions: PruneDecisions or None.
        -> (normalized actions [B, 8, 7] fp32, action hidden states [B, 56, D])."""
        B, P_max = input_ids.shape
        if prompt_lens is None:
            lens = [P_max] * B
        else:  # host lengths (a device tensor here would cost a sync)
            lens = [int(x) for x in (prompt_lens.tolist() if torch.is_tensor(prompt_lens) else prompt_lens)]
        if len(lens) != B or min(lens) < 2 or max(lens) > P_max:
            raise ValueError(f"prompt_lens must give B={B} lengths in [2, {P_max}]; got {lens}")
        prof = self.cfg.profile and self.device.type == "cuda"
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if prof else None
        if prof:
            ev[0].record()
        self.calls += 1
        stats = {"batch": B, "segments": [], "graphed_segments": 0, "eager_segments": 0}
        graphed_b = self.graphs is not None and B in self.cfg.batch_sizes

        patches, prop = self._vision(pixel_values.to(self.dtype), proprio.to(self.dtype), graphed_b)
        if prof:
            ev[1].record()
        st = self._assemble(input_ids, lens, patches, prop)
        for a, b in segments(decisions, self.L):
            rows = None
            if decisions is not None:
                st, rows = self._decide(decisions, a, b, st)
            # a layer whose key mass the decisions wait for: its MLP half runs while the host decides
            early = (rows is not None and st.graphed and st.uniform and self.mode == "cuda" and b < self.L - 1
                     and self.ops.scores == "kernel" and b in decisions.blocking_layers)
            if early:
                mass = self._segment_early_read(a, b, st, rows)
            else:
                out = self._segment(a, b, st, rows)
            stats["segments"].append((a, b, st.T, st.T_pad, st.graphed))
            stats["graphed_segments" if st.graphed else "eager_segments"] += 1
            stats["early_reads"] = stats.get("early_reads", 0) + int(early)
            if rows is not None:
                decisions.scores(b, mass if early else self._key_mass(st, out, rows))
        if prof:
            ev[2].record()
        actions = self._head(B, graphed_b)
        act_h = self._act_buf(B).view(B, self.A, self.D).clone()
        if prof:
            ev[3].record()
            stats["events"] = ev
        self.last_stats = stats
        return actions.float().clone(), act_h

    def split_ms(self) -> dict | None:
        """Vision / backbone / head milliseconds of the last call (runtime.profile=true; synchronizes)."""
        ev = self.last_stats.get("events")
        if not ev:
            return None
        ev[3].synchronize()
        return {"vision": ev[0].elapsed_time(ev[1]), "backbone": ev[1].elapsed_time(ev[2]),
                "head": ev[2].elapsed_time(ev[3]), "total": ev[0].elapsed_time(ev[3])}

    # ------------------------------------------------------------------ vision + projector + proprio
    def _tower(self, vit, x):  # x: [N, 3, 224, 224] -> [N, 256, w]
        c = vit.cfg
        N, w, heads = x.shape[0], c.width, c.heads
        # patch embedding as one GEMM over the unfolded patches (the stride-14 conv is 4-5x slower on an H100)
        p, g = c.patch, x.shape[-1] // c.patch
        patches = x.reshape(N, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(N * g * g, 3 * p * p)
        proj = vit.patch_embed.proj
        t = self.ops.linear(patches, proj.weight.reshape(w, -1), proj.bias).view(N, g * g, w) + vit.pos_embed
        prefix = []
        if c.class_token:
            prefix.append(vit.cls_token.expand(N, -1, -1))
        if c.num_registers:
            prefix.append(vit.reg_token.expand(N, -1, -1))
        if prefix:
            t = torch.cat(prefix + [t], dim=1)
        S = t.shape[1]
        x = t.reshape(N * S, w).contiguous()  # the residual stream, updated in place block by block
        cu = torch.arange(0, (N + 1) * S, S, device=x.device, dtype=torch.int32)
        ops, blocks = self.ops, vit.blocks
        backend = self.vision_attn
        y = F.layer_norm(x, (w,), blocks[0].norm1.weight, blocks[0].norm1.bias, blocks[0].norm1.eps)
        for j, blk in enumerate(blocks):
            # residual adds (x layer scale) are fused with the LayerNorm that follows them (x updated in place)
            qkv = ops.linear(y, blk.attn.qkv.weight, blk.attn.qkv.bias).view(N * S, 3, heads, w // heads)
            o = ops.attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, S, backend=backend)
            a = ops.linear(o.reshape(N * S, w), blk.attn.proj.weight, blk.attn.proj.bias)
            y = ops.add_layer_norm(x, a, layer_scale(blk.ls1), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
            m = ops.linear(F.gelu(ops.linear(y, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight,
                           blk.mlp.fc2.bias)
            g2 = layer_scale(blk.ls2)
            if j + 1 < len(blocks):
                nxt = blocks[j + 1].norm1
                y = ops.add_layer_norm(x, m, g2, nxt.weight, nxt.bias, nxt.eps)
            else:
                x = torch.addcmul(x, m, g2) if g2 is not None else x + m
        return x.view(N, S, w)[:, S - c.num_patches:]

    def _vision_fn(self, pix, prop_in):
        m = self.model
        B = pix.shape[0]
        n_img = self.mcfg.num_images

        def fn(commit: bool):
            imgs = pix.view(B * n_img, 6, *pix.shape[2:])
            if self._side is not None:
                main = torch.cuda.current_stream(self.device)
                self._side.wait_stream(main)
                with torch.cuda.stream(self._side):
                    f2 = self._tower(m.vision_backbone.fused_featurizer, imgs[:, 3:])
                f1 = self._tower(m.vision_backbone.featurizer, imgs[:, :3])
                main.wait_stream(self._side)
                if not torch.cuda.is_current_stream_capturing():
                    f2.record_stream(main)  # eager: f2's memory came from the side stream
            else:
                f1 = self._tower(m.vision_backbone.featurizer, imgs[:, :3])
                f2 = self._tower(m.vision_backbone.fused_featurizer, imgs[:, 3:])
            feats = torch.cat([f1, f2], dim=2).reshape(B * n_img * f1.shape[1], -1)  # [B*512, 2176]
            return {"patches": m.projector(feats), "prop": m.proprio_projector(prop_in)}

        return fn

    def _vision(self, pixel_values, proprio, graphed: bool):
        B = pixel_values.shape[0]
        if not graphed:
            out = self._vision_fn(pixel_values, proprio)(True)
            return out["patches"], out["prop"]
        pix = self._static("pix", tuple(pixel_values.shape))
        prop = self._static("prop_in", tuple(proprio.shape))
        pix.copy_(pixel_values)
        prop.copy_(proprio)
        out = self.graphs.run(("vision", B), self._vision_fn(pix, prop), what=f"the vision towers + projector at B={B}")
        return out["patches"], out["prop"]

    # ------------------------------------------------------------------ packing
    def _cached(self, key: tuple, make):
        """Small device tensors built from host data, kept per key (the oldest dropped beyond 256 keys): built
        once, they cost no host -> device copy (a pageable one waits for every kernel queued before it)."""
        if key not in self._layouts:
            self._layouts[key] = make()
            if len(self._layouts) > 256:
                self._layouts.pop(next(iter(self._layouts)))
        return self._layouts[key]

    def _layout(self, B: int, P_max: int, lens: list[int], T_pad: int):
        """Host-built gather index into [tokens | patches | proprio | zero | stop], positions, cu_seqlens."""

        def make():
            n_patch = self.mcfg.num_patch_tokens - 1  # 512
            o_patch, o_prop = B * P_max, B * P_max + B * n_patch
            o_zero, o_stop = o_prop + B, o_prop + B + 1
            idx, pos, cu = [], [], [0]
            for b, P in enumerate(lens):
                rows = ([b * P_max] + [o_patch + b * n_patch + j for j in range(n_patch)] + [o_prop + b]
                        + [b * P_max + j for j in range(1, P)] + [o_zero] * self.A + [o_stop])
                idx += rows
                pos += list(range(len(rows)))
                cu.append(cu[-1] + len(rows))
            T = cu[-1]
            idx += [o_zero] * (T_pad - T)
            pos += [0] * (T_pad - T)
            cu.append(T_pad)
            dev = self.device
            return (torch.tensor(idx, device=dev), torch.tensor(pos, device=dev),
                    torch.tensor(cu, dtype=torch.int32, device=dev))

        return self._cached((B, P_max, tuple(lens), T_pad), make)

    def _new_state(self, B: int, counts: np.ndarray) -> State:
        T = int(counts.sum())
        T_pad, graphed = self.bucket(B, T)
        if graphed:
            buf = self._buf(B, T_pad)
            h, pos, cu, sel = buf["h"], buf["pos"], buf["cu"], buf["sel"]
        else:
            dev = self.device
            h = torch.empty(T_pad, self.D, dtype=self.dtype, device=dev)
            pos = torch.empty(T_pad, dtype=torch.long, device=dev)
            cu = torch.empty(B + 2, dtype=torch.int32, device=dev)
            sel = torch.zeros(T_pad, dtype=torch.bool, device=dev)
        return State(B, T, T_pad, graphed, h, pos, cu, counts, sel)

    def _assemble(self, input_ids, lens, patches, prop) -> State:
        B, P_max = input_ids.shape
        m = self.mcfg
        n_fixed = m.num_patch_tokens + self.A + 1  # 513 + 56 + 1
        counts = np.array([P + n_fixed for P in lens], dtype=np.int64)
        if int(counts.max()) > self.cos.shape[0]:
            raise ValueError(f"a sequence of {int(counts.max())} positions exceeds the RoPE table "
                             f"({self.cos.shape[0]} positions, max_position_embeddings of the model); use a shorter "
                             f"instruction")
        st = self._new_state(B, counts)
        idx, pos, cu = self._layout(B, P_max, lens, st.T_pad)
        tok = self.model.llm.embed_tokens(input_ids.reshape(-1)).to(self.dtype)
        extra = torch.zeros(2, self.D, dtype=self.dtype, device=self.device)
        extra[1] = self.model.llm.embed_tokens.weight[m.stop_id].to(self.dtype)
        src = torch.cat([tok, patches, prop, extra], dim=0)
        torch.index_select(src, 0, idx, out=st.h)
        st.pos.copy_(pos)
        st.cu.copy_(cu)
        return st

    def _pack(self, st: State, keep: Keep) -> State:
        """The packed rows after a prune: each sample's kept rows, in order (one gather), then padding rows (copies
        of the last kept row, position 0) up to the token bucket. Built from the host's Keep: no device read."""
        valid = keep.valid
        src = (st.starts[:, None] + keep.index)[valid]  # [T'] packed row of every kept token
        new = self._new_state(st.B, keep.counts.astype(np.int64))
        pad = new.T_pad - new.T
        both = np.concatenate([src, np.full(pad, src[-1]), keep.positions[valid], np.zeros(pad, dtype=np.int64),
                               [0], np.cumsum(keep.counts), [new.T_pad]])
        both = to_device_async(both, self.device)  # one copy: [src | positions | cu_seqlens]
        T_pad = new.T_pad
        if new.h.data_ptr() == st.h.data_ptr():  # the same bucket's static buffer: gather out of place first
            new.h.copy_(st.h.index_select(0, both[:T_pad]))
        else:
            torch.index_select(st.h, 0, both[:T_pad], out=new.h)
        new.pos.copy_(both[T_pad:2 * T_pad])
        new.cu.copy_(both[2 * T_pad:])
        return new

    def _decide(self, decisions, a: int, b: int, st: State):
        """keep / rows of the decisions for layers a..b, in order; tokens may change only at a, rows only at b."""
        rows = None
        for i in range(a, b + 1):
            keep = decisions.keep(i)
            if keep is not None:
                if i != a:
                    raise RuntimeError(
                        f"the pruning decisions changed the tokens before layer {i}, inside a graph segment {a}..{b}: "
                        f"decisions that drop tokens after layer {i - 1} must list it in `prune_layers`")
                st = self._pack(st, keep)
            r = decisions.rows(i)
            if r is not None and i != b:
                raise RuntimeError(f"the pruning decisions asked for scores at layer {i}, inside a graph segment "
                                   f"{a}..{b}: list it in `score_layers`")
            rows = r if i == b else rows
        return st, rows

    # ------------------------------------------------------------------ backbone
    def _act_rows(self, st: State) -> torch.Tensor:  # [B*56] packed rows of the action window
        ends = st.cu[1:st.B + 1].long()
        return (ends[:, None] - (self.A + 2) + torch.arange(self.A, device=self.device)[None]).reshape(-1)

    def _act_buf(self, B: int) -> torch.Tensor:
        return self._static("act", (B * self.A, self.D))

    def _layer(self, l: int, h, st: State, max_seqlen: int, *, action_rows=False, score=False, keep_qk=False):
        o, extra = self._attention_part(l, h, st, max_seqlen, score=score, keep_qk=keep_qk)
        if action_rows:  # only the action window leaves the last layer
            rows = self._act_rows(st)
            o, h = o.index_select(0, rows), h.index_select(0, rows)
        # the residual accumulates in place, except into the segment's input buffer (a graph's warm-up call
        # must leave its inputs as they were)
        return self._mlp_part(l, o, h, inplace=h is not st.h), extra

    def _attention_part(self, l: int, h, st: State, max_seqlen: int, *, score=False, keep_qk=False):
        """RMSNorm, QKV, RoPE, attention (+ key mass) of layer l -> (o [T, D], extra)."""
        W, ops, T = self.layers[l], self.ops, h.shape[0]
        H, D = self.H, self.D
        x = ops.rms_norm(h, W.ln1, self.eps)
        qkv = ops.linear(x, W.qkv)  # [T, 3D]
        q, k = ops.rope(qkv, st.pos, self.cos, self.sin, H)
        v = qkv[:, 2 * D:].view(T, H, D // H)
        extra = {}
        if score:
            o, extra["mass"] = ops.attention_scored(q, k, v, st.cu, max_seqlen, st.sel)
        else:
            o = ops.attention(q, k, v, st.cu, max_seqlen)
        if keep_qk:
            extra["q"], extra["k"] = q, k
        return o.reshape(T, D), extra

    def _mlp_part(self, l: int, o, h, *, inplace: bool):
        """O-projection + residual, RMSNorm, gate|up, SiLU*up, down + residual of layer l -> h."""
        W, ops = self.layers[l], self.ops
        h = ops.linear_residual(o, W.o, h, inplace=inplace)
        x = ops.rms_norm(h, W.ln2, self.eps)
        return ops.linear_residual(ops.gate_up_silu(x, W.gu), W.down, h, inplace=True)

    def _max_seqlen(self, st: State) -> int:
        # the longest packed sequence (a sample, or the padding rows), rounded up so that graphs are shared:
        # it sizes the attention grid, so T_pad would launch mostly empty programs for batched samples
        max_seqlen = max(st.S, st.T_pad - st.T, 1)
        return min(st.T_pad, -(-max_seqlen // 64) * 64) if st.graphed else max_seqlen

    def _segment(self, a: int, b: int, st: State, rows) -> dict:
        last = b == self.L - 1
        score_mode = None if rows is None else self.ops.scores
        if score_mode == "kernel":
            self._fill_sel(st, rows)
        max_seqlen = self._max_seqlen(st)
        act_rows_only = self.cfg.last_layer_action_rows

        def fn(commit: bool):
            h, out = st.h, {}
            for l in range(a, b + 1):
                h, extra = self._layer(l, h, st, max_seqlen, action_rows=last and l == self.L - 1 and act_rows_only,
                                       score=score_mode == "kernel" and l == b,
                                       keep_qk=score_mode == "exact" and l == b)
                out.update(extra)
            if last:
                hs = h if act_rows_only else h.index_select(0, self._act_rows(st))
                act = self.ops.rms_norm(hs, self.model.llm.norm.weight, self.eps)
                if commit:
                    self._act_buf(st.B).copy_(act)
            elif commit:
                st.h.copy_(h)
            return out

        if not st.graphed:
            return fn(True)
        key = ("layers", a, b, st.B, st.T_pad, max_seqlen, score_mode)
        return self.graphs.run(key, fn, what=f"backbone layers {a}..{b} at B={st.B}, {st.T_pad} token rows")

    def _segment_early_read(self, a: int, b: int, st: State, rows) -> torch.Tensor:
        """Layers a..b where the decisions wait for layer b's key mass (CUDA graphs, one uniform batch, kernel key
        mass): graph A runs up to layer b's attention, the key mass goes to pinned host memory on a side stream
        while graph B runs the rest of layer b (O-projection and MLP) -- the host decides while the GPU works.
        -> the key mass [B, S] on the host, ready."""
        self._fill_sel(st, rows)
        max_seqlen = self._max_seqlen(st)
        mid_o = self._static("mid_o", (st.T_pad, self.D))  # graph A -> graph B
        mid_h = self._static("mid_h", (st.T_pad, self.D))

        def fn_a(commit: bool):
            h = st.h
            for l in range(a, b):
                h, _ = self._layer(l, h, st, max_seqlen)
            o, extra = self._attention_part(b, h, st, max_seqlen, score=True)
            if commit:
                mid_o.copy_(o)
                mid_h.copy_(h)
            return extra

        def fn_b(commit: bool):
            h = self._mlp_part(b, mid_o, mid_h, inplace=False)  # (its inputs stay as they were: warm-up call)
            if commit:
                st.h.copy_(h)
            return {}

        key = ("layers", a, b, st.B, st.T_pad, max_seqlen, "early")
        out = self.graphs.run(key + ("attention",), fn_a, what=f"backbone layers {a}..{b} (to the attention) at "
                                                               f"B={st.B}, {st.T_pad} token rows")
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            host, done = to_host_async(self._key_mass(st, out, rows))
        self.graphs.run(key + ("mlp",), fn_b, what=f"backbone layer {b} (O-projection + MLP) at B={st.B}, "
                                                    f"{st.T_pad} token rows")
        done.synchronize()
        return host

    def _fill_sel(self, st: State, rows: Rows):
        """The attention kernel's row selection [T_pad] from the host rows: one copy."""
        sel = np.zeros(st.T_pad, dtype=bool)
        sel[(st.starts[:, None] + rows.index)[rows.valid]] = True
        copy_into_async(st.sel, sel)

    def _padded(self, st: State) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(packed row of each [B, S] view slot, valid [B, S] or None when uniform), on the device."""
        S = st.S
        idx = np.minimum(st.starts[:, None] + np.arange(S), st.T_pad - 1)
        if st.uniform:
            return to_device_async(idx, self.device), None
        both = to_device_async(np.concatenate([idx, np.arange(S) < st.counts[:, None]]), self.device)
        return both[:st.B], both[st.B:] != 0

    def _key_mass(self, st: State, out: dict, rows: Rows) -> torch.Tensor:
        """[B, S] fp32 key mass per sample (what llama.key_mass_from_rows gives the reference)."""
        B, S, H, D = st.B, st.S, self.H, self.D
        if "mass" in out:
            if st.uniform:  # a view of the graph's buffer: the decisions copy what they keep
                return out["mass"][:B * S].view(B, S)
            idx, valid = self._padded(st)
            return out["mass"][idx] * valid
        if st.uniform:
            idx, valid = None, None
        else:
            idx, valid = self._padded(st)

        def view(t):  # [T_pad, H, d] -> [B, H, S, d]
            if idx is None:
                return t[:B * S].view(B, S, H, D // H).transpose(1, 2)
            return t[idx].transpose(1, 2)

        return key_mass_from_rows(view(out["q"]), view(out["k"]), padding_bias(valid, self.dtype),
                                  *score_rows_on(rows, self.device))

    # ------------------------------------------------------------------ action head
    def _head_fn(self, B: int):
        act = self._act_buf(B)

        def fn(commit: bool):  # the model's own action head on the 56 action rows of each sample
            return {"actions": self.model.action_head(act.view(B, self.A, self.D))}

        return fn

    def _head(self, B: int, graphed: bool) -> torch.Tensor:
        if not graphed:
            return self._head_fn(B)(True)["actions"]
        return self.graphs.run(("head", B), self._head_fn(B), what=f"the action head at B={B}")["actions"]
