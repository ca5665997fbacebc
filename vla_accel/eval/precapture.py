"""Graph captures and compilation before the first timed chunk: forwards on made-up observations.

    info = precapture(actor, batch_sizes=[1, 2, ..., 8], instructions=[...], image_size=256, steps=3)

For each batch size (smallest first, so that the graph cache, which drops the least recently used graphs beyond
runtime.max_graphs, keeps the largest batch, which a run's first forwards use) `steps` forwards run through
`actor.chunk_batch` on streams 0..B-1 with the run's first B instructions (so prompt lengths, hence token
counts, are the run's) and a made-up scene: a smooth random image whose patches change a little more at each
step, so pruning keeps more tokens from step to step and the captures cover several token buckets. The streams
are reset when their episodes start. Token buckets that only real scenes reach are captured in the loop; those
forwards are marked (`chunk_capture_ms`) and left out of the latency statistics.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from vla_accel.eval.timing import graph_counter

log = logging.getLogger(__name__)


def _scene(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random uint8 [size, size, 3] image (8 x 8 colour blocks, bilinear): scene-like, mostly static."""
    coarse = rng.integers(0, 256, (9, 9, 3)).astype(np.float32)
    x = np.linspace(0, 8, size)
    i = np.minimum(x.astype(int), 7)
    f = (x - i)[:, None]
    rows = coarse[i] * (1 - f[..., None]) + coarse[i + 1] * f[..., None]            # [size, 9, 3]
    img = rows[:, i] * (1 - f.T[..., None]) + rows[:, i + 1] * f.T[..., None]       # [size, size, 3]
    return img.astype(np.uint8)


def observations(size: int, steps: int, streams: int, seed: int = 0) -> list[list[dict]]:
    """steps x streams made-up observations; at step t a square of side size * t / (steps + 1) is repainted."""
    rng = np.random.default_rng(seed)
    base = [(_scene(size, rng), _scene(size, rng)) for _ in range(streams)]
    out = []
    for t in range(steps):
        row = []
        side = size * t // (steps + 1)
        for full, wrist in base:
            full, wrist = full.copy(), wrist.copy()
            if side:
                full[:side, :side] = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                wrist[-side:, -side:] = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            row.append({"full_image": full, "wrist_image": wrist,
                        "state": np.array([0.0, 0.0, 1.0, 3.1, 0.0, 0.0, 0.02, -0.02], np.float32)})
        out.append(row)
    return out


def precapture(actor: Any, *, batch_sizes: Sequence[int], instructions: Sequence[str], image_size: int,
               steps: int = 3) -> dict:
    """Runs the forwards; -> {"ran", "batch_sizes", "forwards", "graphs_captured", "capture_s"} (or why not)."""
    counter = graph_counter(actor)
    if counter is None or not hasattr(actor, "chunk_batch"):
        return {"ran": False, "why": "the policy has no CUDA-graph cache (runtime=reference, remote or a fake)"}
    if steps < 1 or not batch_sizes or not instructions:
        return {"ran": False, "why": "eval.precapture_steps=0" if steps < 1 else "nothing to run"}
    sizes = sorted(set(batch_sizes))
    frames = observations(image_size, steps, max(sizes))
    texts = [instructions[k % len(instructions)] for k in range(max(sizes))]
    captures0, seconds0 = counter()
    forwards = 0
    for B in sizes:
        streams = list(range(B))
        actor.reset(streams)
        for t in range(steps):
            actor.chunk_batch(frames[t][:B], texts[:B], streams)
            forwards += 1
    actor.reset(list(range(max(sizes))))
    captures, seconds = counter()
    cache = actor.policy.executor.graphs
    if cache.evictions:
        log.warning("the graph cache dropped %d graphs (runtime.max_graphs=%d): raise it, or they are captured again "
                    "inside the rollout", cache.evictions, cache.max_graphs)
    info = {"ran": True, "batch_sizes": sizes, "steps": steps, "forwards": forwards,
            "graphs_captured": captures - captures0, "capture_s": round(seconds - seconds0, 3),
            "graphs_evicted": cache.evictions}
    log.info("pre-capture: %d forwards, %d graphs captured (%.1f s of capture) for batch sizes %s", forwards,
             info["graphs_captured"], info["capture_s"], sizes)
    return info
