"""Compile the Hopper flat GEMM for sm_90 without a GPU and report its resources (registers, spills, shared memory,
HGMMA / TMA / cp.async counts): the checks that cost no device time.

    python benchmarks/hopper_compile_check.py                        # the variants the benchmark compiles
    python benchmarks/hopper_compile_check.py --tile 128 128 64 8 4 --gated

Run it with the GPU machine's Triton (3.6.0) for figures that hold there, e.g. in a separate venv holding only
`triton==3.6.0` (torch is not needed): the kernel file imports nothing but triton. ptxas and cuobjdump come with
Triton's wheel.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import tempfile
from pathlib import Path

KERNEL_FILE = Path(__file__).resolve().parents[1] / "kernels" / "flat_gemm_hopper_kernel.py"
# (block_m, block_n, block_k, num_warps, num_stages, tma, warp_spec, epilogue): one of each kind the benchmark uses
DEFAULT = [
    (128, 128, 64, 8, 4, True, False, "none"), (128, 128, 64, 8, 4, True, False, "residual"),
    (128, 128, 64, 8, 4, True, False, "gated"), (128, 256, 64, 8, 3, True, False, "residual"),
    (256, 128, 64, 8, 3, True, False, "none"), (128, 128, 64, 4, 3, True, True, "none"),
    (128, 64, 64, 4, 4, True, True, "gated"), (128, 128, 64, 8, 4, False, False, "none"),
]


def load_kernel():
    spec = importlib.util.spec_from_file_location("flat_gemm_hopper_kernel", KERNEL_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.flat_gemm_hopper_kernel


def compile_variant(fn, bm, bn, bk, warps, stages, tma, warp_spec, epilogue, even_k=True, dtype="bf16") -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    if tma:
        sig.update(X=f"tensordesc<{dtype}[{bm}, {bk}]>", W=f"tensordesc<{dtype}[{bn}, {bk}]>",
                   WU=f"tensordesc<{dtype}[{bn}, {bk}]>")
    else:
        sig.update(X=f"*{dtype}", W=f"*{dtype}", WU=f"*{dtype}")
    sig.update(OUT=f"*{dtype}", RES=f"*{dtype}", BIAS=f"*{dtype}", WS="*fp32", COUNTERS="*i32")
    for name in ("M", "N", "K", "stride_xm", "stride_wn", "stride_om", "stride_rm", "num_dp_tiles", "max_seg"):
        sig[name] = "i32"
    constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_TMA=tma, EVEN_K=even_k, WARP_SPEC=warp_spec,
                      GATED=epilogue == "gated", HAS_BIAS=epilogue == "bias", HAS_RES=epilogue == "residual",
                      DOT_PRECISION="tf32")
    sig.update({k: "constexpr" for k in constexprs})
    # as at launch: pointers and the multiples of 16 (N, K, row strides) carry divisibility hints
    hinted = [a for a in ("OUT", "RES", "BIAS", "WS", "COUNTERS", "N", "K", "stride_xm", "stride_wn", "stride_om",
                          "stride_rm")] + ([] if tma else ["X", "W", "WU"])
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in hinted}
    kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps, num_stages=stages))
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(tool), "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([str(tool), "-sass", cubin], capture_output=True, text=True).stdout
    ptx = kernel.asm["ptx"]
    return {
        "regs": int(re.search(r"REG:(\d+)", usage).group(1)), "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
        "smem": kernel.metadata.shared, "warps": kernel.metadata.num_warps, "HGMMA": sass.count("HGMMA"),
        "LDL": sass.count("LDL"), "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        "cp_async": len(re.findall(r"cp\.async\.c[ag]", ptx)), "setmaxnreg": len(re.findall("setmaxnreg", ptx)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tile", nargs=5, type=int, metavar=("BM", "BN", "BK", "WARPS", "STAGES"))
    ap.add_argument("--pointer", action="store_true", help="pointer loads instead of TMA")
    ap.add_argument("--warp-spec", action="store_true")
    ap.add_argument("--epilogue", default="none", choices=["none", "residual", "gated", "bias"])
    args = ap.parse_args(argv)
    import triton
    print(f"triton {triton.__version__}, target sm_90")
    variants = DEFAULT if args.tile is None else [(*args.tile, not args.pointer, args.warp_spec, args.epilogue)]
    fn = load_kernel()
    for v in variants:
        label = "bm{}.bn{}.bk{}.w{}.s{} tma{:d} ws{:d} {}".format(*v[:5], v[5], v[6], v[7])
        try:
            r = compile_variant(fn, *v)
            print(f"{label:<42} " + " ".join(f"{k} {val}" for k, val in r.items()), flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{label:<42} FAILED {type(e).__name__}: {str(e).splitlines()[-1][:200]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
