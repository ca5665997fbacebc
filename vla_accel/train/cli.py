"""`vla-accel-train`: train a small OpenVLA-OFT-architecture policy on scripted-expert demos.

    vla-accel-demos --out /work/data/demos --tasks 0-9 --episodes 0-19           # 1. demonstrations
    vla-accel-train train.demos=/work/data/demos hydra.run.dir=outputs/train/object  # 2. training
    vla-accel-eval policy=checkpoint policy.checkpoint=outputs/train/object/checkpoint \
        'eval.suites=[libero_object]'                                             # 3. closed loop
    vla-accel-train train=smoke train.demos=...       # a few steps of the tiny model (CPU smoke test)

Config: configs/training.yaml with the group `train` (configs/train/*.yaml; fields in
vla_accel/train/config.py). The same hydra.run.dir again resumes. Writes into the run dir:
checkpoint/ (official layout, `load_policy`-ready), train_state.pt, loss.jsonl, loss.png, summary.json.
Full guide: docs/training.md.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vla_accel.train.config import TrainConfigError, train_config

log = logging.getLogger("vla_accel.train")


def run_train(cfg: DictConfig) -> dict:
    from vla_accel._compat import hide_unloadable_torchvision
    from vla_accel.train.trainer import train

    hide_unloadable_torchvision()  # transformers (the tokenizer loader) must not import a broken torchvision
    tc = train_config(cfg.train)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    log.info("run dir: %s", run_dir)
    summary = train(tc, run_dir)
    def fmt(x):
        return "-" if x is None else f"{x:.4f}"

    log.info("done (%s): step %d, train L1 %s (average of the last logged steps), val L1 %s; checkpoint %s",
             summary["stop"], summary["step"], fmt(summary["train_loss_ema"]), fmt(summary["val_loss"]),
             summary["checkpoint"])
    return summary


@hydra.main(version_base="1.3", config_path="pkg://vla_accel.configs", config_name="training")
def main(cfg: DictConfig) -> None:
    try:
        run_train(cfg)
    except (TrainConfigError, FileNotFoundError) as err:
        print(f"vla-accel-train: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
