"""The OpenVLA-OFT training recipe on our own model code, for a small configuration trained from scratch.

One step: a batch of (two camera images, 8-D proprio, instruction) samples -> the model's forward
exactly as at inference (prompt + 29871, 512 patch tokens + proprio token, 56 zeroed placeholder
positions + stop token, bidirectional attention, the 8x7 chunk decoded in parallel from one
forward) -> L1 loss against the bounds_q99-normalized action chunk. AdamW, linear warm-up, an
optional step decay (OFT's MultiStepLR), gradient clipping, bfloat16 autocast on CUDA. Images: the
stored JPEG frames decoded and resized as the policy does, then a random 90%-area crop per image.

Run dir layout (resumable: the same run dir continues from train_state.pt):
    checkpoint/            the official on-disk layout (config.json, model.safetensors,
                           action_head--STEP_checkpoint.pt, proprio_projector--STEP_checkpoint.pt,
                           dataset_statistics.json, tokenizer files, training.json): load_policy(dir)
    train_state.pt         model + optimizer + step + RNG states, for resuming
    loss.jsonl             one line per log_every steps (and each validation)
    loss.png               the loss curve
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vla_accel.checkpoint import init_random_, save_checkpoint
from vla_accel.model.oft import OpenVLAOFT
from vla_accel.model.vit import LayerScale
from vla_accel.policy import Policy
from vla_accel.tokenizer import LazyTokenizer, tokenize_prompt
from vla_accel.train.augment import model_pixels
from vla_accel.train.config import TrainConfig
from vla_accel.train.data import STATS_FILE, TrainArrays, list_episodes, load_training_arrays
from vla_accel.train.plot import plot_losses
from vla_accel.train.tokenizer import build_tokenizer, save_tokenizer

log = logging.getLogger("vla_accel.train")

STATE_FILE = "train_state.pt"
LOSS_FILE = "loss.jsonl"
CKPT_DIR = "checkpoint"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but torch sees no CUDA device; use train.device=cpu (or auto)")
    return torch.device(name)


def build_model(cfg: TrainConfig, device: torch.device, used_ids: list[int] | None = None) -> OpenVLAOFT:
    """Random initialization (vla_accel.checkpoint.init_random_, seeded), LayerScale at layer_scale_init.

    used_ids: token ids the model can ever see; every other row of the token embedding starts (and,
    receiving no gradient, stays) zero, so the checkpoint compresses to a fraction of its size.
    """
    torch.manual_seed(cfg.seed)
    model = OpenVLAOFT(cfg.model_size.oft_config()).to(device)
    init_random_(model, cfg.seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LayerScale):
                for p in m.parameters():
                    p.fill_(cfg.model_size.layer_scale_init)
        if used_ids is not None:
            weight = model.llm.embed_tokens.weight
            keep = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
            keep[torch.tensor(sorted(set(used_ids)), device=weight.device)] = True
            weight[~keep] = 0.0
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases, embeddings, LayerScale, tokens)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name and "token" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, cfg: TrainConfig, decay_step: int | None) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    decay = cfg.decay_factor if decay_step is not None and step >= decay_step else 1.0
    return warm * decay


PROBE_SKIP, PROBE_STEPS = 10, 30  # a max_minutes budget times steps 10..40 (after warm-up), then plans


def fit_steps(cfg: TrainConfig, start: int, done: int, elapsed: float, step_s: float) -> tuple[int, int | None]:
    """(steps, decay_step) that fit max_minutes: `done` steps after `start` took `elapsed` s in all and the
    next ones take `step_s` each; the learning-rate schedule is scaled along."""
    fit = start + done + int(0.95 * (60 * cfg.max_minutes - elapsed) / max(step_s, 1e-9))
    if fit >= cfg.steps:
        return cfg.steps, cfg.decay_step
    decay = None if cfg.decay_step is None else max(1, round(cfg.decay_step * fit / cfg.steps))
    return max(fit, start + done), decay


def split_episodes(arrays: TrainArrays, per_task: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices (train, val): the last `per_task` episodes of each instruction are held out."""
    val_eps = set()
    if per_task:
        by_task: dict[int, list[int]] = {}
        for ep in range(len(arrays.sources)):
            task = int(arrays.instruction[np.argmax(arrays.episode == ep)])
            by_task.setdefault(task, []).append(ep)
        for eps in by_task.values():
            if len(eps) > per_task:  # never hold out a task's only episodes
                val_eps.update(sorted(eps, key=lambda e: arrays.sources[e])[-per_task:])
    is_val = np.isin(arrays.episode, sorted(val_eps))
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


class Batcher:
    """Turns sample indices into model inputs on the device (ids padded as Policy.batch_ids does)."""

    def __init__(self, arrays: TrainArrays, policy: Policy, device: torch.device, cfg: TrainConfig):
        self.arrays, self.policy, self.device, self.cfg = arrays, policy, device, cfg
        # token ids exactly as the policy computes them at inference (the saved tokenizer files)
        self.prompt_ids = [tokenize_prompt(policy.tokenizer, text) for text in arrays.instructions]
        self.frames = arrays.frames
        if device.type == "cuda" and cfg.frames_on_device != "false":
            free, _ = torch.cuda.mem_get_info(device)
            if cfg.frames_on_device == "true" or arrays.frames.nbytes < free // 2:
                self.frames = torch.from_numpy(arrays.frames).to(device)  # no host->device copy per step

    def __call__(self, idx: np.ndarray, *, augment: bool, generator: torch.Generator | None = None):
        a = self.arrays
        ids, lens = self.policy.batch_ids([self.prompt_ids[i] for i in a.instruction[idx]])
        if isinstance(self.frames, torch.Tensor):
            frames = self.frames[torch.from_numpy(idx).to(self.device)]
        else:
            frames = torch.from_numpy(self.frames[idx]).to(self.device)
        pixels = model_pixels(frames, self.policy.image_norm, crop_scale=self.cfg.crop_scale,
                              random_crop=augment and self.cfg.random_crop,
                              jitter=augment and self.cfg.color_jitter, generator=generator)
        proprio = torch.from_numpy(a.proprio[idx]).to(self.device)
        targets = torch.from_numpy(a.targets[idx]).to(self.device)
        return ids.to(self.device), lens.to(self.device), pixels, proprio, targets


def l1_loss(model, batch, amp: bool) -> torch.Tensor:
    ids, lens, pixels, proprio, targets = batch
    with torch.autocast(device_type=pixels.device.type, dtype=torch.bfloat16, enabled=amp):
        pred, _ = model(ids, pixels, proprio, prompt_lens=lens)
    return F.l1_loss(pred.float(), targets)


@torch.no_grad()
def validate(model, batcher: Batcher, idx: np.ndarray, batch_size: int, amp: bool) -> float:
    """Mean L1 over `idx` with the evaluation's center crop."""
    model.eval()
    total = 0.0
    for start in range(0, len(idx), batch_size):
        part = idx[start:start + batch_size]
        total += float(l1_loss(model, batcher(part, augment=False), amp)) * len(part)
    model.train()
    return total / max(len(idx), 1)


def write_checkpoint(run_dir: Path, model, stats: dict, tokenizer_dir: Path, step: int, info: dict) -> Path:
    """checkpoint/ in the official layout, replaced as a whole (a crash leaves the previous one)."""
    final, tmp, old = run_dir / CKPT_DIR, run_dir / f"{CKPT_DIR}.tmp", run_dir / f"{CKPT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, tmp, norm_stats=stats, step=step)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, tmp / f.name)
    (tmp / "training.json").write_text(json.dumps({**info, "step": step}, indent=2))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _read_losses(path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {"train": [], "val": []}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            for k in series:
                if r.get(k) is not None:
                    series[k].append((r["step"], r[k]))
    return series


def train(cfg: TrainConfig, run_dir: str | Path) -> dict:
    """Trains (or resumes) in `run_dir`; returns a summary (final losses, step, checkpoint path)."""
    from tqdm import tqdm

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    amp = cfg.amp == "bfloat16" or (cfg.amp == "auto" and device.type == "cuda")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # 1. data: successful demo episodes, no-ops dropped, statistics, frames decoded like the policy does
    paths = list_episodes(cfg.demos, cfg.suite)
    if not paths:
        raise FileNotFoundError(f"no demo episodes of {cfg.suite} under {cfg.demos} (expected "
                                f"{cfg.demos}/{cfg.suite}/task*_ep*.npz from vla-accel-demos)")
    t0 = time.perf_counter()
    arrays = load_training_arrays(paths, cfg.dataset_name, chunk=8, workers=cfg.decode_workers, progress=cfg.progress)
    train_idx, val_idx = split_episodes(arrays, cfg.val_episodes_per_task)
    log.info("demos: %d episodes, %d samples (%d train / %d val), %d instructions, decoded in %.0f s",
             len(arrays.sources), len(arrays.targets), len(train_idx), len(val_idx), len(arrays.instructions),
             time.perf_counter() - t0)
    (run_dir / STATS_FILE).write_text(json.dumps(arrays.stats, indent=2))

    # 2. tokenizer (saved with the checkpoint; the prompt ids come back through the policy's own loader)
    tok_dir = run_dir / "tokenizer"
    save_tokenizer(build_tokenizer(arrays.instructions), tok_dir)
    tokenizer = LazyTokenizer(tok_dir)
    prompt_ids = [tokenize_prompt(tokenizer, text) for text in arrays.instructions]
    mc = cfg.model_size.oft_config()
    used = {i for ids in prompt_ids for i in ids} | {mc.bos_id, mc.stop_id, mc.empty_id, mc.llm.pad_id}
    model = build_model(cfg, device, sorted(used))
    policy = Policy(model, norm_stats=arrays.stats, tokenizer=tokenizer)
    model.train()
    batcher = Batcher(arrays, policy, device, cfg)
    n_params = sum(p.numel() for p in model.parameters())

    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    step = 0
    total_steps, decay_step = cfg.steps, cfg.decay_step
    state_path = run_dir / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, rng = state["step"], state["rng"]
        if state.get("cfg_steps") == cfg.steps:  # the same settings: keep the plan a time budget made
            total_steps, decay_step = state["total_steps"], state["decay_step"]
        gen.set_state(state["generator"].cpu())
        log.info("resuming from step %d (%s)", step, state_path)
    info = {"config": {k: v for k, v in vars(cfg).items() if k != "model_size"}, "parameters": n_params,
            "samples": int(len(arrays.targets)), "train_samples": int(len(train_idx)),
            "val_samples": int(len(val_idx)), "episodes": arrays.sources, "instructions": arrays.instructions,
            "device": str(device), "amp": amp, "image_pipeline": "JPEG q95 (PIL) + processing.resize_like_reference "
            "+ random crop (scale %.2f)%s" % (cfg.crop_scale, " + color jitter" if cfg.color_jitter else "")}
    log.info("model: %.2f M parameters; device %s, amp %s", n_params / 1e6, device, amp)

    def save(at_step: int) -> Path:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": at_step, "rng": rng,
                    "generator": gen.get_state(), "total_steps": total_steps, "decay_step": decay_step,
                    "cfg_steps": cfg.steps},
                   state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)
        path = write_checkpoint(run_dir, model, arrays.stats, tok_dir, at_step, info)
        plot_losses(_read_losses(run_dir / LOSS_FILE), run_dir / "loss.png",
                    title=f"L1 loss (normalized actions), {cfg.name}")
        return path

    # 3. the loop
    loss_log = open(run_dir / LOSS_FILE, "a")
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=None if cfg.progress else True,
               dynamic_ncols=True)
    started, running, last_val = time.perf_counter(), None, None
    first_step, stop_reason = step, "steps"
    try:
        while step < total_steps:
            if cfg.max_minutes is not None and step - first_step in (PROBE_SKIP, PROBE_SKIP + PROBE_STEPS):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                if step - first_step == PROBE_SKIP:
                    probe_start = now
                else:
                    step_s = (now - probe_start) / PROBE_STEPS
                    fit, decay_step = fit_steps(cfg, first_step, step - first_step, now - started, step_s)
                    log.info("%.3f s/step; training %d steps (lr decay at %s) to fit max_minutes=%s",
                             step_s, fit, decay_step, cfg.max_minutes)
                    total_steps = bar.total = fit
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg, decay_step)
            batch = batcher(rng.choice(train_idx, cfg.batch_size), augment=True, generator=gen)
            loss = l1_loss(model, batch, amp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            bar.update(1)
            record = None
            if step % cfg.log_every == 0:  # the only per-step read of a device value: no sync in between
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"loss is {value} at step {step}; lower train.lr or check the demos")
                running = value if running is None else 0.9 * running + 0.1 * value
                bar.set_postfix(loss=f"{running:.4f}", val=f"{last_val:.4f}" if last_val is not None else "-",
                                refresh=False)
                record = {"step": step, "train": value, "train_ema": running, "lr": opt.param_groups[0]["lr"],
                          "seconds": round(time.perf_counter() - started, 1)}
            if len(val_idx) and (step % cfg.val_every == 0 or step == total_steps):
                last_val = validate(model, batcher, val_idx, cfg.batch_size, amp)
                record = {**(record or {"step": step}), "val": last_val}
            if record:
                loss_log.write(json.dumps(record) + "\n")
                loss_log.flush()
            out_of_time = cfg.max_minutes is not None and time.perf_counter() - started > 60 * cfg.max_minutes
            if step % cfg.save_every == 0 or step == total_steps or out_of_time:
                save(step)
            if out_of_time:
                stop_reason = f"max_minutes={cfg.max_minutes}"
                break
    except KeyboardInterrupt:
        stop_reason = "interrupted"
        save(step)
        raise
    finally:
        bar.close()
        loss_log.close()
    ckpt = run_dir / CKPT_DIR
    if not ckpt.exists():  # resumed a run that had already finished its steps
        save(step)
    summary = {"step": step, "planned_steps": total_steps, "stop": stop_reason, "train_loss_ema": running,
               "val_loss": last_val, "checkpoint": str(ckpt), "seconds": round(time.perf_counter() - started, 1),
               "parameters": n_params}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
