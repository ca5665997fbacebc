"""Where the accelerated forward spends its time: the backbone's ops at the token counts the policy sees.

    python -m vla_accel.runtime.micro [--out micro.json]        # GPU only

Per op: median time (triton.testing.do_bench), achieved TFLOP/s and fraction of its roofline floor
max(bytes / 2.96 TB/s, FLOPs / 750 TFLOP/s) (bytes: weights + activations in/out, read or written once).
GEMMs: cuBLAS (F.linear) and the kernels' dispatch (vla_accel.kernels.linear with the packaged table).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from .roofline import floor_ms

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
TOKENS = [16, 64, 160, 208, 304, 608, 1600, 4864]


def bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3  # us


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    dev = torch.device("cuda")
    rows = []
    try:
        import vla_accel.kernels as K

        table = K.default_table(dev)
    except Exception as err:  # noqa: BLE001
        K, table = None, None
        print(f"vla_accel.kernels not importable: {err}")
    g = torch.Generator(device=dev).manual_seed(0)
    for name, (N, Kd) in SHAPES.items():
        w = torch.randn(N, Kd, device=dev, generator=g).bfloat16() * 0.02
        for M in TOKENS:
            x = torch.randn(M, Kd, device=dev, generator=g).bfloat16()
            fl, nb = 2 * M * N * Kd, 2 * (N * Kd + M * Kd + M * N)
            r = {"op": f"linear:{name}", "N": N, "K": Kd, "M": M, "floor_us": 1e3 * floor_ms(nb, fl)}
            r["cublas_us"] = bench(lambda: F.linear(x, w))
            if K is not None:
                r["dispatch_impl"] = K.choose(table, (N, Kd), M)
                r["dispatch_us"] = bench(lambda: K.linear(x, w, table=table))
            rows.append(r)
    from .fused import Ops, rope_table
    from .config import RuntimeConfig

    for T, lens in ((608, [601]), (1600, [200] * 8), (4864, [601] * 8)):
        q, k, v = (torch.randn(T, 32, 128, device=dev, generator=g).bfloat16() for _ in range(3))
        cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))] + [T], dtype=torch.int32, device=dev)
        fl = sum(4 * n * n * 4096 for n in lens)
        r = {"op": "attention", "M": T, "seqs": len(lens), "floor_us": 1e3 * floor_ms(4 * T * 4096 * 2, fl)}
        ops = Ops(RuntimeConfig(attention="flash"), dev, torch.bfloat16)
        r["flash_us"] = bench(lambda: ops.attention(q, k, v, cu, T))
        if K is not None:
            r["kernels_us"] = bench(lambda: K.attention(q, k, v, cu, T))
        rows.append(r)
    for H, d, S in ((16, 64, 261), (16, 72, 256)):  # the vision towers: 2 images per tower, no padding
        T = 2 * S
        qkv = torch.randn(T, 3, H, d, device=dev, generator=g).bfloat16()
        cu = torch.tensor([0, S, T], dtype=torch.int32, device=dev)
        r = {"op": f"vision_attention:d{d}", "M": T, "floor_us": 1e3 * floor_ms(3 * T * H * d * 2, 2 * 4 * S * S * H * d)}
        ops = Ops(RuntimeConfig(attention="flash"), dev, torch.bfloat16)
        r["flash_us"] = bench(lambda: ops.attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, S))
        r["sdpa_dense_us"] = bench(lambda: ops.attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, S, backend="sdpa_dense"))
        if K is not None:  # head dim 72 zero-padded to 128 inside Ops.attention
            kops = Ops(RuntimeConfig(attention="kernels"), dev, torch.bfloat16)
            r["kernels_us"] = bench(lambda: kops.attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, S, backend="kernels"))
        rows.append(r)
    ops = Ops(RuntimeConfig(rowwise="triton"), dev, torch.bfloat16)
    cos, sin = rope_table(2048, 128, 10000.0, torch.bfloat16, dev)
    for T in (208, 608, 1600):
        x = torch.randn(T, 4096, device=dev, generator=g).bfloat16()
        wn = torch.ones(4096, device=dev, dtype=torch.bfloat16)
        qkv = torch.randn(T, 12288, device=dev, generator=g).bfloat16()
        pos = torch.arange(T, device=dev) % 600
        gu = torch.randn(T, 22016, device=dev, generator=g).bfloat16()
        for name, fn, nb, ref in (
                ("rms_norm", lambda: ops.rms_norm(x, wn, 1e-6), 4 * T * 4096,
                 lambda: wn * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()),
                ("rope_split", lambda: ops.rope(qkv, pos, cos, sin, 32), 2 * T * 4096 * 4, None),
                ("silu_mul", lambda: ops.silu_mul(gu), 2 * T * 11008 * 3, lambda: F.silu(gu[:, :11008]) * gu[:, 11008:])):
            r = {"op": name, "M": T, "floor_us": 1e3 * floor_ms(nb, 0), "triton_us": bench(fn)}
            if ref is not None:
                r["torch_us"] = bench(ref)
            rows.append(r)
    for r in rows:
        best = min(v for k, v in r.items() if k.endswith("_us") and k != "floor_us")
        r["best_over_floor"] = best / r["floor_us"]
        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
