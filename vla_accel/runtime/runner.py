"""AccelRunner: the whole OpenVLA-OFT forward on packed token rows, pruning-aware, CUDA-graphed.

    runner = AccelRunner(policy.model, RuntimeConfig())
    actions, action_hidden = runner(input_ids, pixel_values, proprio, prompt_lens, hook=plan)

Same signature and results as `OpenVLAOFT.forward` (the plain model stays the reference). What differs:
  - the batch is PACKED: T = sum of per-sample token counts rows [T, D] plus padding rows up to a token bucket;
    `cu_seqlens` [B+2] int32 marks the samples (and the padding rows, a sequence of their own). Samples with
    different kept counts (ragged batches from pruning) cost only their own tokens.
  - weights: QKV and gate/up concatenated once at build (one GEMM each), residual adds in the GEMM epilogue,
    RMSNorm / RoPE(+q/k split) / SiLU*up as one Triton pass each, varlen flash attention.
  - vision: both cameras in one batch, the two towers on two CUDA streams; projector + proprio in one graph.
  - graphs: vision (per B), backbone segments (per first/last layer, B, token bucket), head (per B).
  - last layer: O-proj, MLP and final norm only for the 56 action rows of each sample.

Pruning hooks follow the llama.py protocol (before_layer / score_rows / on_scores) with padded [B, S] views,
exactly as the reference calls them. A hook that names `score_layers` and `prune_layers` (PrunePlan does) is
served by graph segments that end at those layers; any other hook gets one segment per layer. The hook must
copy what it keeps of `h` and of the key mass it gets in on_scores: both may be windows on static buffers.
A hook that lists layers in `blocking_score_layers` (it reads their key mass at once and decides on the host:
PrunePlan's static layers) gets that key mass as a host tensor, copied while the GPU runs the rest of the layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._device import copy_into_async, to_host_async
from ..model.llama import key_mass_from_rows, padding_bias
from ..model.oft import OpenVLAOFT
from .config import RuntimeConfig
from .fused import Ops, rope_table
from .graphs import GraphCache
from .weights import LayerWeights, fuse_backbone


# ---------------------------------------------------------------------------- layer segments
def hook_segments(hook, num_layers: int) -> list[tuple[int, int]]:
    """Layer ranges [a, b] run as one piece. No hook: the whole backbone. A hook that declares
    `score_layers` and `prune_layers`: pieces end at each of those layers (the hook reads scores after a score
    layer and may drop tokens after a prune layer). Any other hook: one layer per piece."""
    if hook is None:
        return [(0, num_layers - 1)]
    score, prune = getattr(hook, "score_layers", None), getattr(hook, "prune_layers", None)
    if score is None or prune is None:
        ends = set(range(num_layers))
    else:
        ends = {int(i) for i in list(score) + list(prune) if 0 <= int(i) < num_layers} | {num_layers - 1}
    out, a = [], 0
    for b in sorted(ends):
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
    counts: torch.Tensor  # [B] rows per sample (device)
    view_pos: torch.Tensor  # [B, S] positions as the hook sees them
    view_mask: torch.Tensor | None  # [B, S] key mask as the hook sees it (None: no padding)
    pack_idx: torch.Tensor  # [B, S] packed row of each view slot (valid where view_mask)
    sel: torch.Tensor | None = None  # [T_pad] bool score rows (kernel key-mass path)
    host_rows: tuple | None = None  # the hook's score rows on the host (numpy), when it offers them
    history: list = field(default_factory=list)

    @property
    def S(self) -> int:
        return self.view_pos.shape[1]

    @property
    def uniform(self) -> bool:  # packed rows == the view's rows (no per-sample padding)
        return self.view_mask is None


class AccelRunner:
    host_prompt_lens = True  # the policy may pass prompt_lens as a host tensor (read on the host here)

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
            # B = 1 against 11.8 / 12.5 us for FA2 varlen (runtime.profile, 2026-11-24)
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
        return {"executor": "accel", "mode": self.mode, "config": self.cfg.to_dict(), "ops": self.ops.describe(),
                "vision_attention": self.vision_attn,
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
    def __call__(self, input_ids, pixel_values, proprio, prompt_lens=None, hook=None):
        return self.forward(input_ids, pixel_values, proprio, prompt_lens=prompt_lens, hook=hook)

    @torch.inference_mode()
    def forward(self, input_ids, pixel_values, proprio, prompt_lens=None, hook=None):
        """-> (normalized actions [B, 8, 7] fp32, action hidden states [B, 56, D])."""
        B, P_max = input_ids.shape
        if prompt_lens is None:
            lens = [P_max] * B
        else:  # the policy hands host lengths (host_prompt_lens): a device tensor here would cost a sync
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
        for a, b in hook_segments(hook, self.L):
            rows = None
            if hook is not None:
                st, rows = self._call_hook(hook, a, b, st)
            # a layer whose key mass the hook waits for: its MLP half runs while the host decides
            early = (rows is not None and st.graphed and st.uniform and self.mode == "cuda" and b < self.L - 1
                     and self.ops.scores == "kernel" and b in getattr(hook, "blocking_score_layers", ()))
            if early:
                mass = self._segment_early_read(a, b, st, rows)
            else:
                out = self._segment(a, b, st, rows)
            stats["segments"].append((a, b, st.T, st.T_pad, st.graphed))
            stats["graphed_segments" if st.graphed else "eager_segments"] += 1
            stats["early_reads"] = stats.get("early_reads", 0) + int(early)
            if rows is not None:
                hook.on_scores(b, mass if early else self._key_mass(st, out, rows), st.view_pos, st.view_mask)
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
            y = ops.add_layer_norm(x, a, blk.ls1.scale_factor if c.layer_scale else None, blk.norm2.weight, blk.norm2.bias,
                                   blk.norm2.eps)
            m = ops.linear(F.gelu(ops.linear(y, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight,
                           blk.mlp.fc2.bias)
            g2 = blk.ls2.scale_factor if c.layer_scale else None
            if j + 1 < len(blocks):
                nxt = blocks[j + 1].norm1
                y = ops.add_layer_norm(x, m, g2, nxt.weight, nxt.bias, nxt.eps)
            else:
                x = torch.addcmul(x, m, g2) if g2 is not None else x + m
        return x.view(N, S, w)[:, S - c.num_patches:]

    def _vision_fn(self, pix, prop_in):
        m, ops = self.model, self.ops
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
            pj = m.projector
            x = F.gelu(ops.linear(feats, pj.fc1.weight, pj.fc1.bias))
            x = F.gelu(ops.linear(x, pj.fc2.weight, pj.fc2.bias))
            x = ops.linear(x, pj.fc3.weight, pj.fc3.bias)
            pp = m.proprio_projector
            p = ops.linear(F.gelu(ops.linear(prop_in, pp.fc1.weight, pp.fc1.bias)), pp.fc2.weight, pp.fc2.bias)
            return {"patches": x, "prop": p}

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

    def _new_state(self, B, T, S, view_pos, view_mask, counts) -> State:
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
        return State(B, T, T_pad, graphed, h, pos, cu, counts, view_pos, view_mask, None, sel)

    def _assemble(self, input_ids, lens, patches, prop) -> State:
        B, P_max = input_ids.shape
        m, dev = self.mcfg, self.device
        n_fixed = m.num_patch_tokens + self.A + 1  # 513 + 56 + 1
        lengths = [P + n_fixed for P in lens]
        T, S = sum(lengths), max(lengths)
        if S > self.cos.shape[0]:
            raise ValueError(f"a sequence of {S} positions exceeds the RoPE table ({self.cos.shape[0]} positions, "
                             f"max_position_embeddings of the model); use a shorter instruction")
        view_pos = torch.arange(S, device=dev)[None].expand(B, S)
        len_t = self._cached(("lengths", tuple(lengths)), lambda: torch.tensor(lengths, device=dev))
        view_mask = None if min(lengths) == S else view_pos < len_t[:, None]
        st = self._new_state(B, T, S, view_pos, view_mask, len_t)
        idx, pos, cu = self._layout(B, P_max, lens, st.T_pad)
        emb = self.model.llm.embed_tokens.weight
        tok = F.embedding(input_ids.reshape(-1), emb).to(self.dtype)
        extra = torch.zeros(2, self.D, dtype=self.dtype, device=dev)
        extra[1] = emb[m.stop_id].to(self.dtype)
        src = torch.cat([tok, patches, prop, extra], dim=0)
        torch.index_select(src, 0, idx, out=st.h)
        st.pos.copy_(pos)
        st.cu.copy_(cu)
        starts = cu[:B].long()
        st.pack_idx = starts[:, None] + torch.arange(S, device=dev)[None]
        return st

    def _pack(self, B, h, positions, key_mask, host_counts=None) -> State:
        """A hook's padded (h [B, S', D], positions, key_mask) -> a packed State (valid rows in order).
        host_counts: the hook's own rows per sample (PrunePlan.kept_counts), else read back from key_mask."""
        S2, dev = h.shape[1], self.device
        if key_mask is None:  # every sample has S2 rows: packed = the view's rows; no device-side bookkeeping
            st = self._new_state(B, B * S2, S2, positions, None, None)
            src, cu, pack_idx, counts = self._uniform_layout(B, S2, st.T_pad)
            st.counts, st.pack_idx = counts, pack_idx
            torch.index_select(h.reshape(B * S2, -1), 0, src, out=st.h)  # padding rows: copies of the last row
            torch.index_select(positions.reshape(-1), 0, src, out=st.pos)
            st.cu.copy_(cu)
            return st
        counts = key_mask.sum(1)
        # rows in total: from the hook's host counts, else a device read (a sync: ragged batches, other hooks)
        T = int(host_counts.sum()) if host_counts is not None else int(counts.sum())
        st = self._new_state(B, T, S2, positions, key_mask, counts)
        valid = key_mask.reshape(-1).long()
        csum = valid.cumsum(0)
        src = torch.searchsorted(csum, torch.arange(1, st.T_pad + 1, device=dev)).clamp_(max=B * S2 - 1)
        torch.index_select(h.reshape(B * S2, -1), 0, src, out=st.h)  # padding rows: copies of the last row
        torch.index_select(positions.reshape(-1), 0, src, out=st.pos)
        cu = torch.zeros(B + 2, dtype=torch.int32, device=dev)
        cu[1:B + 1] = counts.cumsum(0).to(torch.int32)
        cu[B + 1] = st.T_pad
        st.cu.copy_(cu)
        st.pack_idx = (csum - 1).view(B, S2)
        return st

    def _uniform_layout(self, B: int, S: int, T_pad: int):
        """Cached device tensors of B samples x S rows padded to T_pad: gather index, cu_seqlens, pack map, counts."""

        def make():
            dev = self.device
            src = torch.arange(T_pad, device=dev).clamp_(max=B * S - 1)
            cu = torch.tensor([b * S for b in range(B + 1)] + [T_pad], dtype=torch.int32, device=dev)
            pack_idx = torch.arange(B * S, device=dev).view(B, S)
            counts = torch.full((B,), S, dtype=torch.long, device=dev)
            return src, cu, pack_idx, counts

        return self._cached(("uniform", B, S, T_pad), make)

    def _view_h(self, st: State) -> torch.Tensor:
        """The hook's padded view [B, S, D] of the packed rows (zero-copy when no sample is padded)."""
        if st.uniform:
            return st.h[:st.B * st.S].view(st.B, st.S, self.D)
        idx = st.pack_idx.clamp(0, st.T_pad - 1)
        return torch.where(st.view_mask[..., None], st.h[idx], torch.zeros((), dtype=self.dtype, device=self.device))

    def _call_hook(self, hook, a: int, b: int, st: State):
        """before_layer / score_rows for layers a..b, in the reference's order; tokens may change only at a."""
        h_view = self._view_h(st)
        rows = None
        for i in range(a, b + 1):
            h2, pos2, mask2 = hook.before_layer(i, h_view, st.view_pos, st.view_mask)
            if h2 is not h_view or pos2 is not st.view_pos or mask2 is not st.view_mask:
                if i != a:
                    raise RuntimeError(
                        f"the pruning hook changed the tokens before layer {i}, inside a graph segment "
                        f"{a}..{b}: a hook that drops tokens after layer {i - 1} must list it in `prune_layers` "
                        f"(or define neither score_layers nor prune_layers: one segment per layer)")
                st = self._pack(st.B, h2, pos2, mask2, getattr(hook, "kept_counts", {}).get(i))
                h_view = h2
            r = hook.score_rows(i, st.view_pos, st.view_mask)
            if r is not None and i != b:
                raise RuntimeError(f"the pruning hook asked for scores at layer {i}, inside a graph segment {a}..{b}: "
                                   f"list it in `score_layers`")
            rows = r if i == b else rows
        if rows is not None:
            st.host_rows = getattr(hook, "score_rows_host", {}).get(b)
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
        """Layers a..b where the hook waits for layer b's key mass (CUDA graphs, one uniform batch, kernel key
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

    def _fill_sel(self, st: State, rows):
        if st.host_rows is not None and st.uniform:  # built on the host: one copy instead of six device ops
            idx, valid = st.host_rows
            sel = np.zeros(st.T_pad, dtype=bool)
            sel[(idx + st.S * np.arange(st.B)[:, None])[valid]] = True
            copy_into_async(st.sel, sel)
            return
        row_idx, row_valid = rows
        if st.uniform:  # packed row = b * S + s
            prow = row_idx + torch.arange(0, st.B * st.S, st.S, device=self.device)[:, None]
        else:
            prow = st.pack_idx.gather(1, row_idx.clamp(0, st.S - 1))
        prow = torch.where(row_valid, prow, torch.full_like(prow, st.T_pad))  # invalid -> the extra slot
        sel = torch.zeros(st.T_pad + 1, dtype=torch.int8, device=self.device).scatter_(0, prow.reshape(-1), 1)
        st.sel.copy_(sel[:st.T_pad])  # (scatter_ with a scalar: no host round trip, unlike sel[idx] = True)

    def _key_mass(self, st: State, out: dict, rows) -> torch.Tensor:
        """[B, S] fp32 key mass in the hook's view (what llama.key_mass_from_rows gives the reference)."""
        if "mass" in out:
            if st.uniform:  # a view of the graph's buffer: the hook copies what it keeps (as with h)
                return out["mass"][:st.B * st.S].view(st.B, st.S)
            mass = out["mass"][st.pack_idx.clamp(0, st.T_pad - 1)]
            return mass * st.view_mask
        B, S, H, D = st.B, st.S, self.H, self.D

        def view(t):  # [T_pad, H, d] -> [B, H, S, d]
            if st.uniform:
                return t[:B * S].view(B, S, H, D // H).transpose(1, 2)
            return t[st.pack_idx.clamp(0, st.T_pad - 1)].transpose(1, 2)

        return key_mass_from_rows(view(out["q"]), view(out["k"]), padding_bias(st.view_mask, self.dtype), *rows)

    # ------------------------------------------------------------------ action head
    def _head_fn(self, B: int):
        act, head = self._act_buf(B), self.model.action_head.model
        chunk = self.mcfg.chunk
        ops = self.ops

        def fn(commit: bool):
            x = act.view(B * chunk, -1)  # [B*8, 7*D]
            ln = head.layer_norm1
            x = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
            x = F.relu(ops.linear(x, head.fc1.weight, head.fc1.bias))
            for blk in head.mlp_resnet_blocks:
                ln, lin = blk.ffn[0], blk.ffn[1]
                y = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
                x = x + F.relu(ops.linear(y, lin.weight, lin.bias))
            ln = head.layer_norm2
            x = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
            return {"actions": ops.linear(x, head.fc2.weight, head.fc2.bias).view(B, chunk, -1)}

        return fn

    def _head(self, B: int, graphed: bool) -> torch.Tensor:
        if not graphed:
            return self._head_fn(B)(True)["actions"]
        return self.graphs.run(("head", B), self._head_fn(B), what=f"the action head at B={B}")["actions"]
