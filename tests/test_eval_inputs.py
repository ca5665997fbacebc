"""Bad input to `vla-accel-eval`: one message, exit status 2, no traceback, before any simulator starts.

The CLI cases run `vla-accel-eval` on the fake simulator (tests/fakesim.py) so they need no LIBERO;
the loader cases call vla_accel directly.
"""

import json

import fakesim
import pytest

from vla_accel import CheckpointError, load_policy, random_policy, save_checkpoint
from vla_accel.eval import results as R
from vla_accel.eval.config import ConfigError

ARGS = ["env.image_size=64", "env.max_steps=4", "eval.progress=false", "policy.device=cpu"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny checkpoint without tokenizer files (tests add them to copies where needed)."""
    root = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(random_policy("tiny", seed=5), root)
    return root


def eval_fake(run_dir, *extra):
    rc, out = fakesim.finish(fakesim.launch([*ARGS, f"hydra.run.dir={run_dir}", *extra]), timeout=180)
    assert "Traceback" not in out, out[-4000:]
    return rc, out


@pytest.mark.parametrize("overrides,message", [
    (["prune=bogus"], "Could not find 'prune/bogus'"),                                  # Hydra's own error
    (["prune.name=bogus"], "prune.name=bogus names no pruning settings (the prune group holds only a name); "
                           "choose a prune config with prune=<name>: dynamic_only, none, specprune, static_only"),
    (["runtime=accel", "runtime.gemm=bogus"], "runtime=accel: runtime.gemm must be one of"),
    (["policy.dtype=fp16"], "policy.dtype must be one of auto, float32, bfloat16, float16; got 'fp16'"),
    (["eval.step_timeout_s=0"], "eval.step_timeout_s must be a positive number"),
])
def test_config_errors_exit_2_with_one_message(tmp_path, overrides, message):
    rc, out = eval_fake(tmp_path / "run", *overrides)
    assert rc == 2 and message in out, out[-4000:]
    assert not (tmp_path / "run" / R.RESULTS_FILE).exists()


def test_checkpoint_errors_exit_2(tmp_path):
    rc, out = eval_fake(tmp_path / "run", "policy=checkpoint", f"policy.checkpoint={tmp_path / 'nothing'}")
    assert rc == 2 and f"policy.checkpoint={tmp_path / 'nothing'} cannot be loaded" in out, out[-4000:]


def test_checkpoint_without_tokenizer_fails_before_any_simulator(tmp_path, tiny_ckpt):
    rc, out = eval_fake(tmp_path / "run", "policy=checkpoint", f"policy.checkpoint={tiny_ckpt}",
                        "policy.unnorm_key=random_no_noops")
    assert rc == 2 and "cannot tokenize the task instruction" in out and "tokenizer files" in out, out[-4000:]
    assert "simulator worker" not in out and not (tmp_path / "run" / R.RESULTS_FILE).exists()


def test_loader_names_bad_dtypes_and_empty_statistics(tmp_path, tiny_ckpt):
    for dtype in ("fp16", "int8"):
        with pytest.raises(ValueError, match=f"dtype must be one of float32, bfloat16, float16 .*got '{dtype}'"):
            load_policy(tiny_ckpt, device="cpu", dtype=dtype)
        with pytest.raises(ValueError, match="dtype must be one of"):
            random_policy("tiny", dtype=dtype)
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    (ckpt / "dataset_statistics.json").write_text(json.dumps({}))
    with pytest.raises(CheckpointError, match=r"dataset_statistics.json' holds none \(an empty mapping\)"):
        load_policy(ckpt, device="cpu")


def test_an_instruction_longer_than_the_model_is_refused():
    from vla_accel.eval.factory import check_prompts
    from vla_accel.policy import ChunkedActor

    actor = ChunkedActor(random_policy("tiny"))
    check_prompts(actor, ["put the bowl on the plate"])
    with pytest.raises(ConfigError, match=r"makes a sequence of 2\d\d\d tokens; the model has 2048 positions"):
        check_prompts(actor, ["put the bowl " * 120])
