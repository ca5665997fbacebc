"""Training a small OpenVLA-OFT-architecture policy on scripted-expert LIBERO demonstrations.

    vla-accel-demos --out DEMOS --suite libero_object --tasks 0-9 --episodes 0-19   # vla_accel.train.demos
    vla-accel-train train.demos=DEMOS hydra.run.dir=RUN                            # vla_accel.train.cli
    vla_accel.load_policy(f"{RUN}/checkpoint", unnorm_key="libero_object")

Modules: `demos` (the recorder, `vla-accel-demos`), `data` (demo files, statistics, the arrays training
reads), `augment` (random crop, color jitter, normalization in torch), `tokenizer` (word-level
stand-in tokenizer saved with the checkpoint), `trainer` (the OFT recipe), `config` (typed
settings), `cli` (`vla-accel-train`), `plot` (loss curve PNG), `pack` (thinned demo copies for
transfer), `report` (closed-loop success tables with intervals), `fixture` (the CI fixture).
The scripted expert itself is `vla_accel.envs.expert`. Guide: docs/training.md.
"""
