"""vla-accel-tune: the kernels' tuner (vla_accel.kernels.tune) for this project's models.

    vla-accel-tune --preset 7b                         # the 7B backbone's and both vision towers' shapes (default)
    vla-accel-tune --config CHECKPOINT/config.json     # the backbone's shapes from a checkpoint's config
    vla-accel-tune --preset tiny --m 1 16 64 --out /tmp/table.json
    vla-accel-tune --budget-s 150 --out /tmp/table.json

The table goes to --out, else to the user's cache ($XDG_CACHE_HOME/vla_accel/tables/<gpu>.json, or ~/.cache/...),
where `vla_accel.kernels.default_table` (hence runtime=accel) looks before the tables packaged with the kernels.
Every other option is the kernel tuner's (`python -m vla_accel.kernels.tune --help`).
"""

from __future__ import annotations

import argparse
import sys

from ..model.config import PRESETS, preset


def tuner_argv(argv: list[str]) -> list[str]:
    """--preset NAME -> the kernel tuner's --dims (hidden intermediate heads kv_heads) and one --vit (width, MLP
    width, rows per sample = tokens per image x images) per vision tower; 7b when no shapes are given."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--preset", choices=sorted(PRESETS))
    args, rest = p.parse_known_args(argv)
    if args.preset is None and any(a in rest for a in ("--dims", "--config", "-h", "--help")):
        return rest
    cfg = preset(args.preset or "7b")
    llm = cfg.llm
    out = rest + ["--dims", str(llm.hidden), str(llm.intermediate), str(llm.heads), str(llm.kv_heads)]
    for t in cfg.towers:
        rows = (t.num_patches + int(t.class_token) + t.num_registers) * cfg.num_images
        out += ["--vit", str(t.width), str(t.mlp_dim), str(rows)]
    return out


def main(argv=None) -> int:
    from vla_accel.kernels.tune import main as tune

    return tune(tuner_argv(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
