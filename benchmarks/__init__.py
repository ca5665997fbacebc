"""Benchmarks and profiling: scripts run from a checkout root (not installed with the package).

    python -m benchmarks.e2e --trace .devcarry/libero_spatial_t0.npz --out DIR   # end to end, configurations (a)-(e)
    python -m benchmarks.kernels --out DIR                                        # kernels vs cuBLAS / SDPA (GPU)
    python -m benchmarks.profile_step --trace T.npz --out DIR                          # where a step's time goes (GPU)
    python -m benchmarks.plan_host --layout tiny 7b --batch 1 8                   # the pruning plan's host time (CPU)
    python -m benchmarks.record_trace --out .devcarry/libero_spatial_t0.npz       # a LIBERO trace for e2e / profile

roofline.py holds the floors, stock.py configuration (a) (transformers' LlamaModel), targets.json the targets the
e2e benchmark checks; results/ the latest result per GPU; docs/performance.md what they mean.
"""
