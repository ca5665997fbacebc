"""A stand-in for the tuner's compile run (kernels.tune._compile_job), importable by its worker processes."""

import time


def sleepy_job(job) -> str | None:
    """'hang' never finishes within a test's limit, 'bad' fails, anything else succeeds."""
    if job.impl == "hang":
        time.sleep(600)
    return "RuntimeError: bad" if job.impl == "bad" else None
