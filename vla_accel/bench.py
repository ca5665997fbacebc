"""`vla-accel-bench`: benchmarks of this project.

    vla-accel-bench e2e [args]       # the end-to-end policy benchmark on a recorded LIBERO trace (default)
    vla-accel-bench kernels [args]   # the kernel micro-benchmarks (vla_accel.kernels.bench)
    vla-accel-bench e2e --help       # the arguments of each
"""

from __future__ import annotations

import sys

COMMANDS = ("e2e", "kernels")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = "e2e"
    if argv and not argv[0].startswith("-"):
        cmd = argv.pop(0)
    elif argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    if cmd == "e2e":
        from vla_accel.runtime.bench import main as run
    elif cmd == "kernels":
        from vla_accel.kernels.bench import main as run
    else:
        raise SystemExit(f"vla-accel-bench: unknown command '{cmd}'; valid commands: {', '.join(COMMANDS)}")
    run(argv)


if __name__ == "__main__":
    main()
