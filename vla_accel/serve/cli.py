"""`vla-accel-serve`: the policy (accelerated, pruned) behind the openpi websocket and the OpenVLA-OFT REST protocols.

    vla-accel-serve                                             # tiny RANDOM-weight policy on :8777, mode=chunk
    vla-accel-serve policy=checkpoint policy.checkpoint=moojink/openvla-7b-oft-finetuned-libero-spatial \
        policy.unnorm_key=libero_spatial prune=specprune runtime=accel serve.port=8777
    vla-accel-serve ... serve.mode=action serve.max_batch=16 serve.batch_window_ms=3

Config groups (vla_accel/configs): policy, prune, runtime (the eval's, built by the eval's factory), serve.
Stop with Ctrl-C / SIGTERM: requests in flight finish first. Guide: docs/serving.md.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("vla_accel.serve")


def build(cfg: DictConfig):
    """(actor, ServeConfig, identity) from the composed config; the actor through the eval's own
    construction path; identity: what of the served policy decides results (weights' content hash,
    dtype, statistics key, pruning, runtime), announced to clients so a remote eval's run dir is
    fingerprinted by the server's policy."""
    from vla_accel.eval.config import ConfigError, run_config_from_hydra
    from vla_accel.eval.factory import build_actor, policy_identity

    from .config import ServeConfig

    serve_cfg = ServeConfig.from_dict(cfg.get("serve"))
    # the eval's typed settings need env / eval groups the server has no use for: their defaults
    rc = run_config_from_hydra(OmegaConf.merge({"env": {}, "eval": {}}, cfg))
    if rc.policy.name == "remote":
        raise ConfigError("vla-accel-serve needs a local policy (policy=random_tiny or policy=checkpoint), "
                          "not policy=remote")
    actor = build_actor(rc)
    identity = {"policy": policy_identity(rc.policy, actor.describe().get("unnorm_key")),
                "prune": rc.prune, "runtime": rc.runtime}
    return actor, serve_cfg, identity


def run(cfg: DictConfig) -> None:
    actor, serve_cfg, identity = build(cfg)
    desc = actor.describe()
    log.info("policy: %s", {k: desc[k] for k in list(desc)[:8]})
    if desc.get("random_weights"):
        log.warning("the policy has RANDOM weights (policy=random_tiny): its actions mean nothing")
    from .app import serve

    def ready(server) -> None:
        log.info("serving %s on %s:%d (mode=%s, max_batch=%d, window %g ms)", serve_cfg.protocol, serve_cfg.host,
                 serve_cfg.port, serve_cfg.mode, serve_cfg.max_batch, serve_cfg.batch_window_ms)

    serve(actor, serve_cfg, on_ready=ready, identity=identity)


@hydra.main(version_base="1.3", config_path="pkg://vla_accel.configs", config_name="serve")
def main(cfg: DictConfig) -> None:
    from vla_accel.eval.config import ConfigError

    from .config import ServeConfigError

    try:
        run(cfg)
    except (ConfigError, ServeConfigError) as err:
        print(f"vla-accel-serve: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
