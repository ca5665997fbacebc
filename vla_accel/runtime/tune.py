"""vla-accel-tune: the kernels' tuner (vla_accel.kernels.tune) for this project's models.

    vla-accel-tune --preset 7b                         # the 7B backbone's linear shapes (default)
    vla-accel-tune --config CHECKPOINT/config.json     # shapes from a checkpoint's config
    vla-accel-tune --preset tiny --m 1 16 64 --out /tmp/table.json

The table goes to --out, else to the user's cache ($XDG_CACHE_HOME/vla_accel/tables/<gpu>.json, or ~/.cache/...),
where `vla_accel.kernels.default_table` (hence runtime=accel) looks before the tables packaged with the kernels.
Every other option is the kernel tuner's (`python -m vla_accel.kernels.tune --help`).
"""

from __future__ import annotations

import argparse
import sys

from ..model.config import PRESETS, preset


def tuner_argv(argv: list[str]) -> list[str]:
    """--preset NAME -> the kernel tuner's --dims (hidden intermediate heads kv_heads); 7b when no shapes given."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--preset", choices=sorted(PRESETS))
    args, rest = p.parse_known_args(argv)
    if args.preset is None and any(a in rest for a in ("--dims", "--config", "-h", "--help")):
        return rest
    llm = preset(args.preset or "7b").llm
    return rest + ["--dims", str(llm.hidden), str(llm.intermediate), str(llm.heads), str(llm.kv_heads)]


def main(argv=None) -> int:
    from vla_accel.kernels.tune import main as tune

    return tune(tuner_argv(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
