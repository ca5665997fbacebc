"""Thin a demo folder to a size limit for transfer: every action and state, the frames of every k-th step.

    python -m vla_accel.train.pack --src /work/data/demos --out .devcarry/demos --max-mib 56
    python -m vla_accel.train.pack --src ... --out .devcarry/demos_b --max-mib 56 --part 1 --parts 2

Training on a thinned copy samples only the steps that kept their frames; statistics and action
chunks still use every step. The stride k is the smallest that fits `--max-mib` (or `--stride`);
episode i keeps the steps t with t % k == i % k, so the kept phases differ between episodes.
`--part i --parts n` packs episodes i, i+n, i+2n, ... only (several transfers of one demo set).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from vla_accel.train.data import CAMERAS, Episode, list_episodes, load_episode, save_episode


def thin(ep: Episode, stride: int, phase: int) -> Episode:
    steps = ep.steps_with_frames
    keep = [i for i, t in enumerate(steps) if t % stride == phase % stride]
    return Episode(meta={**ep.meta, "frame_stride": stride}, state=ep.state, action=ep.action,
                   jpegs={c: [ep.jpegs[c][i] for i in keep] for c in CAMERAS},
                   frame_steps=np.asarray(steps)[keep])


def frame_bytes(ep: Episode, stride: int, phase: int) -> int:
    steps = ep.steps_with_frames
    return sum(len(ep.jpegs[c][i]) for c in CAMERAS for i, t in enumerate(steps) if t % stride == phase % stride)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vla_accel.train.pack", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="demo folder (vla-accel-demos --out)")
    ap.add_argument("--out", required=True, help="output folder (replaced)")
    ap.add_argument("--max-mib", type=float, default=56.0, help="size limit of the output (MiB)")
    ap.add_argument("--stride", type=int, default=None, help="keep every k-th frame (default: smallest that fits)")
    ap.add_argument("--part", type=int, default=0, help="pack episodes part, part+parts, ... only")
    ap.add_argument("--parts", type=int, default=1)
    args = ap.parse_args(argv)
    if not 0 <= args.part < args.parts:
        ap.error(f"--part must be in [0, --parts), got {args.part} of {args.parts}")
    paths = list_episodes(args.src)[args.part::args.parts]
    episodes = [(p, load_episode(p)) for p in paths]
    episodes = [(p, e) for p, e in episodes if e.meta.get("success")]
    if not episodes:
        ap.error(f"no successful episodes under {args.src}")
    other = 64 * 1024 + sum(e.state.nbytes + e.action.nbytes + 4096 for _, e in episodes)  # arrays, meta, zip
    limit = args.max_mib * 2**20

    def size(k: int) -> int:
        return other + sum(frame_bytes(e, k, i) for i, (_, e) in enumerate(episodes))

    stride = args.stride or next((k for k in range(1, 257) if size(k) <= limit), None)
    if stride is None or size(stride) > limit:
        ap.error(f"{len(episodes)} episodes do not fit {args.max_mib} MiB even at stride {stride or 256}; "
                 "use --parts")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    for i, (p, e) in enumerate(episodes):
        save_episode(out / p.relative_to(args.src), thin(e, stride, i))
    total = sum(f.stat().st_size for f in out.rglob("*.npz"))
    print(f"packed {len(episodes)} episode(s) with frame stride {stride}: {total / 2**20:.1f} MiB in {out}")


if __name__ == "__main__":
    main()
