"""Make the CI fixture from a trained checkpoint and closed-loop runs of it.

    python -m vla_accel.train.fixture --checkpoint RUN/checkpoint --runs EVAL_DIR... --out tests/fixtures/trained_object

Copies the checkpoint (the files load_policy reads, nothing else) and writes ci_episode.json: the
(task, episode) that every given run solved in the fewest steps (the runs should include prune=none and
prune=specprune), with a step limit of that many steps plus a margin, for
tests/test_train_closed_loop.py. Refuses when no episode was solved by every run.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from vla_accel.train.report import load_run

CHECKPOINT_FILES = ("config.json", "model.safetensors", "dataset_statistics.json", "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json", "training.json")
PATTERNS = ("action_head--*_checkpoint.pt", "proprio_projector--*_checkpoint.pt")


def pick_episode(runs: list[dict], margin: int) -> dict:
    """The episode solved by every run with the smallest worst-case step count."""
    common = set.intersection(*(set(r["records"]) for r in runs))
    solved = [k for k in common if all(r["records"][k]["success"] for r in runs)]
    if not solved:
        raise ValueError(f"no episode was solved by all {len(runs)} runs ({', '.join(r['label'] for r in runs)})")
    worst = {k: max(r["records"][k]["steps"] for r in runs) for k in solved}
    suite, task, episode = min(solved, key=lambda k: (worst[k], k))
    return {"suite": suite, "task_id": task, "episode": episode, "max_steps": worst[(suite, task, episode)] + margin,
            "steps": {r["label"]: r["records"][(suite, task, episode)]["steps"] for r in runs}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vla_accel.train.fixture", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--runs", nargs="+", required=True, help="vla-accel-eval run dirs of this checkpoint")
    ap.add_argument("--out", required=True)
    ap.add_argument("--margin", type=int, default=40, help="steps added to the slowest run's step count")
    args = ap.parse_args(argv)
    try:
        case = pick_episode([load_run(d) for d in args.runs], args.margin)
    except ValueError as err:
        raise SystemExit(f"fixture: {err}") from None
    src, out = Path(args.checkpoint), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    for pattern in PATTERNS:
        found = sorted(src.glob(pattern))
        if len(found) != 1:
            raise SystemExit(f"expected one {pattern} in {src}, found {[p.name for p in found]}")
        shutil.copy2(found[0], out / found[0].name)
    (out / "ci_episode.json").write_text(json.dumps(case, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"fixture {out}: {size / 2**20:.1f} MiB; CI episode {case}")


if __name__ == "__main__":
    main()
