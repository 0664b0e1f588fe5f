"""The Ray Train loop: one copy runs in every worker.

Each worker streams its own part of the corpus, the model is wrapped in DDP (gloo on CPU, nccl on
GPU), and every `checkpoint_every_steps` (and at each epoch end) rank 0 writes a checkpoint with
model, optimiser, scheduler, step counters and RNG states. After a worker failure or a driver
restart, `ray.train.get_checkpoint()` hands back the latest one and training continues from that
step and batch. Rank 0 logs to MLflow through a non-blocking `RunLogger`.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from avssl import storage
from avssl.config.loader import config_from_dict
from avssl.config.schema import Config
from avssl.data.corpus import Corpus
from avssl.data.loader import RankStream, iterate_rows, rows_for_pretraining
from avssl.models import AVSSLModel, recalibrate_batchnorm, save_encoder
from avssl.objectives import build_objective
from avssl.objectives.audio_attributes import add_targets, fit_target_stats

STATE_FILE = "state.pt"
ENCODER_FILE = "encoder.pt"
TRACKING_STATUS_FILE = "tracking_status.json"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches done in the current epoch
    samples: int = 0  # clips seen, all workers
    train_seconds: float = 0.0  # time in training steps, summed over restarts
    restarts: int = 0
    resumed_from_step: int = -1


def amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int, floor: float = 0.05):
    """Linear warm-up over `warmup` steps (from lr/warmup to lr), then cosine decay to `floor` x lr
    at step `total`: torch's own schedulers, chained."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    base = optimizer.param_groups[0]["lr"]
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=floor * base)
    if warmup <= 0:
        return cosine
    ramp = LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Running:
    """Means of the loss components since the last log."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        # Summed on the device: no host sync per step, one per log interval.
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else float(v))
        self.n += 1

    def pop(self) -> dict[str, float]:
        out = {k: float(v) / max(1, self.n) for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return out


def _save_state(path: Path, model, optimizer, scheduler, scaler, state: TrainState, generator: torch.Generator) -> None:
    """Tensors and plain values only: `torch.load(..., weights_only=True)` reads it back."""
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "state": asdict(state),
        "rng": {
            "torch": torch.get_rng_state(),
            "generator": generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
    }
    torch.save(payload, path / STATE_FILE)


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def _restore(parts: "TrainParts", checkpoint: Any) -> TrainState:
    """Model, optimiser, scheduler, scaler, RNG states and counters from a reported checkpoint."""
    with checkpoint.as_directory() as d:
        payload = load_state(Path(d))
    parts.model.load_state_dict(payload["model"])
    parts.optimizer.load_state_dict(payload["optimizer"])
    parts.scheduler.load_state_dict(payload["scheduler"])
    if parts.scaler is not None and payload["scaler"]:
        parts.scaler.load_state_dict(payload["scaler"])
    state = TrainState(**payload["state"])
    state.restarts += 1
    state.resumed_from_step = state.step
    torch.set_rng_state(payload["rng"]["torch"])
    parts.generator.set_state(payload["rng"]["generator"])
    return state


@torch.no_grad()
def _validation(model: AVSSLModel, objective, batches: list[dict[str, torch.Tensor]], device: torch.device, seed: int) -> dict[str, float]:
    model.eval()
    running = Running()
    gen = torch.Generator().manual_seed(seed)
    for batch in batches:
        batch = to_device(batch, device)
        inputs = objective.model_inputs(batch, gen)
        outputs = model(**inputs)
        loss, parts = objective.loss(outputs, batch, inputs, model)
        running.add({"loss": loss, **parts})
    model.train()
    out = {f"val/{k}": v for k, v in running.pop().items()}
    if objective.visual and batches:
        out["val/copy_still/visual"] = _copy_still_loss(objective, batches, seed)
    return out


def _copy_still_loss(objective, batches: list[dict[str, torch.Tensor]], seed: int) -> float:
    """The visual loss of a generator that returns the still frame: the bar to beat."""
    from avssl.objectives.visual import visual_loss

    gen, total = torch.Generator().manual_seed(seed), 0.0
    for batch in batches:
        inputs = objective.model_inputs(batch, gen)
        copy = {"generated": inputs["still"][inputs["clip_of"]]}
        total += float(visual_loss(copy, batch, inputs, objective.cfg.visual))
    return total / len(batches)


@torch.no_grad()
def generated_frames_figure(model: AVSSLModel, batch: dict[str, torch.Tensor], device: torch.device, n: int = 10, title: str = ""):
    """Real vs generated frames of one fixed validation clip, with its audio energy."""
    from avssl.figures import generated_vs_real
    from avssl.objectives.visual import to_unit

    model.eval()
    batch = to_device({k: v[:1] for k, v in batch.items()}, device)
    t = int(batch["lengths"][0])
    idx = torch.linspace(0, t - 1, min(n, t)).round().long().to(device)
    torch.manual_seed(0)
    out = model(batch["wave"], still=to_unit(batch["still"]).unsqueeze(1), clip_of=torch.zeros_like(idx), frame_of=idx)
    model.train()
    real = to_unit(batch["frames"][0, idx]).cpu().numpy()
    gen = out["generated"][:, 0].float().cpu().numpy()
    wave = batch["wave"][0].cpu().numpy()[: t * 640].reshape(t, 640)
    energy = np.sqrt((wave**2).mean(1))[idx.cpu().numpy()]
    return generated_vs_real(real, gen, energy, title)


def _record_worker(run_dir: storage.Location, rank: int, world: int) -> None:
    """Which process and node holds which rank, for operators (and fault-injection tests)."""
    import json
    import os
    import socket

    import ray

    try:
        info = {"rank": rank, "world_size": world, "pid": os.getpid(), "host": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id(), "started": time.time()}
        storage.write_bytes(storage.join(run_dir, "workers", f"rank{rank}.json"), json.dumps(info).encode())
    except OSError:
        pass  # a read-only or unreachable run folder: nothing to record


@dataclass
class TrainParts:
    """Everything one worker trains with; shared by the Ray loop and the plain-loop benchmark."""

    corpus: Corpus
    objective: Any
    stream: RankStream
    model: AVSSLModel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[Any]
    generator: torch.Generator
    dtype: Optional[torch.dtype]
    device: torch.device
    epoch_steps: list[int]
    total_steps: int


def build_parts(cfg: Config, rank: int, world: int, device: torch.device) -> TrainParts:
    corpus = Corpus(cfg.data.corpus)
    objective = build_objective(cfg.objective)
    rows = rows_for_pretraining(corpus, cfg.data.pretrain_fraction, cfg.seed)
    stream = RankStream(
        corpus, rows, cfg.data.batch_size, rank, world, cfg.seed,
        crop_frames=cfg.data.clip_frames, still=cfg.data.still_frame,
        with_video=objective.visual, prefetch=cfg.data.prefetch_batches,
        transform=partial(add_targets, cfg=cfg.objective.audio) if objective.audio else None,
    )
    torch.manual_seed(cfg.seed)
    model = AVSSLModel(cfg.model, cfg.objective, corpus.frame_size, objective.visual, objective.audio)
    if objective.audio:  # the same clips on every rank: identical statistics
        sample = rows_for_pretraining(corpus, 1.0, cfg.seed, max_clips=128)
        fit_target_stats(model, (b for _, b in iterate_rows(corpus, sample, 32)), cfg.objective.audio)
    model = model.to(device)
    epoch_steps = [stream.batches_in_epoch(e) for e in range(cfg.train.epochs)]
    total_steps = sum(epoch_steps)
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.train.warmup_steps, total_steps)
    dtype = amp_dtype(cfg.train.mixed_precision, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    return TrainParts(corpus, objective, stream, model, optimizer, scheduler, scaler, generator, dtype, device, epoch_steps, total_steps)


def train_step(p: TrainParts, model: torch.nn.Module, raw: AVSSLModel, batch: dict[str, torch.Tensor], grad_clip: float,
               timings: Optional[dict[str, float]] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """One optimiser step; `model` may be the DDP wrapper of `raw`. With `timings`, the seconds
    spent in each phase are added to it (the benchmarks' step-time split)."""
    clock = time.perf_counter
    t0 = clock()
    batch = to_device(batch, p.device)
    inputs = p.objective.model_inputs(batch, p.generator)
    with torch.autocast(p.device.type, dtype=p.dtype or torch.float32, enabled=p.dtype is not None):
        outputs = model(**inputs)
    loss, parts = p.objective.loss(outputs, batch, inputs, raw)
    t1 = clock()
    p.optimizer.zero_grad(set_to_none=True)
    if p.scaler is not None:
        p.scaler.scale(loss).backward()
        p.scaler.unscale_(p.optimizer)
    else:
        loss.backward()
    t2 = clock()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if p.scaler is not None:
        p.scaler.step(p.optimizer)
        p.scaler.update()
    else:
        p.optimizer.step()
    p.scheduler.step()
    if timings is not None:
        timings["forward"] = timings.get("forward", 0.0) + t1 - t0
        timings["backward"] = timings.get("backward", 0.0) + t2 - t1
        timings["optimizer"] = timings.get("optimizer", 0.0) + clock() - t2
    return loss, parts, int(batch["wave"].shape[0])


def _write_tracking_status(run_dir: storage.Location, result: dict[str, Any]) -> None:
    """What reached MLflow, for the driver's final message (the driver cannot see rank 0's logger)."""
    import json

    try:
        storage.write_bytes(storage.join(run_dir, TRACKING_STATUS_FILE), json.dumps(result).encode())
    except OSError:
        pass


class RayTrainSession:
    """The loop's view of Ray Train: one of `world` DDP workers, checkpoints reported to the controller."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path] = None, name: Optional[str] = None) -> None:
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics, checkpoint=None)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)), checkpoint_dir_name=name)


class TuneTrialSession:
    """The loop run inside a Tune trial's own process (a one-worker trial): no nested trainer, no
    DDP; checkpoints go to the trial's storage through `tune.report`, and a restored trial gets
    the latest one back from `tune.get_checkpoint()`, as a Ray Train worker would."""

    rank, world = 0, 1

    def __init__(self) -> None:
        import ray

        self.device = torch.device("cuda", 0) if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
        self.last: dict[str, Any] = {}

    def get_checkpoint(self):
        from ray import tune

        return tune.get_checkpoint()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path] = None, name: Optional[str] = None) -> None:
        from ray import tune

        self.last = metrics
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        tune.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point: the loop on one of the trainer's workers."""
    from avssl.tracking import system_metrics

    session = RayTrainSession()
    with system_metrics(config, session.rank):
        run_loop(config, session)


def run_loop(config: dict[str, Any], session: Any) -> None:
    """The training loop, on a `RayTrainSession` (one DDP worker of a TorchTrainer) or a
    `TuneTrialSession` (inside a one-worker Tune trial). Same steps, checkpoints and logging."""
    from avssl.runtime import quiet_train_worker_logs
    from avssl.tracking import RunLogger

    cfg: Config = config_from_dict(config["cfg"])
    quiet_train_worker_logs(cfg.train.log_level)
    rank, world = session.rank, session.world
    torch.set_num_threads(cfg.train.threads_per_worker or max(1, int(cfg.train.cpus_per_worker)))
    device = session.device
    _record_worker(storage.join(cfg.train.storage_path, str(cfg.run_name)), rank, world)

    parts = build_parts(cfg, rank, world, device)
    corpus, objective, stream, model = parts.corpus, parts.objective, parts.stream, parts.model
    optimizer, scheduler, scaler, generator = parts.optimizer, parts.scheduler, parts.scaler, parts.generator
    epoch_steps, total_steps = parts.epoch_steps, parts.total_steps
    state = TrainState()

    checkpoint = session.get_checkpoint()
    if checkpoint is not None:
        state = _restore(parts, checkpoint)
        if rank == 0:
            print(f"[avssl] resumed from checkpoint at step {state.step} (epoch {state.epoch + 1}, batch {state.batch})", flush=True)

    model = session.prepare_model(model)
    raw: AVSSLModel = model.module if hasattr(model, "module") else model

    logger = None
    if rank == 0 and config.get("run_id"):
        logger = RunLogger(config["tracking_uri"], config["run_id"], fallback_dir=storage.local_folder(cfg.train.storage_path, str(cfg.run_name)) / "unsent_artifacts")
        if state.resumed_from_step >= 0:
            logger.metrics({"resumed_from_step": state.resumed_from_step}, state.step)

    evaluator = EpochEvaluator(cfg, corpus, objective) if rank == 0 else None

    def report(metrics: dict[str, float], with_checkpoint: bool) -> None:
        if not with_checkpoint or rank != 0:
            session.report(metrics)
            return
        if logger is not None:
            # The history up to a checkpoint is sent before the checkpoint exists: a node that dies
            # after it then loses no metrics the resumed run will not log again.
            logger.sync()
        with tempfile.TemporaryDirectory() as tmp:
            _save_state(Path(tmp), raw, optimizer, scheduler, scaler, state, generator)
            session.report(metrics, Path(tmp), f"checkpoint_step{state.step:07d}")

    running = Running()
    exported = False
    window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
    done = state.step >= total_steps
    for epoch in range(state.epoch, cfg.train.epochs):
        if done:
            break
        start_batch = state.batch if epoch == state.epoch else 0
        epoch_time, epoch_samples = 0.0, 0  # time in data loading + steps, without evals and reports
        t_wait = time.perf_counter()
        for batch in stream.epoch(epoch, start_batch):
            data_wait += time.perf_counter() - t_wait
            loss, loss_parts, bsz = train_step(parts, model, raw, batch, cfg.train.grad_clip)
            state.step += 1
            state.batch += 1
            state.samples += bsz * world
            epoch_samples += bsz
            window_samples += bsz
            running.add({"loss": loss.detach(), **loss_parts})
            done = state.step >= total_steps
            step_seconds = time.perf_counter() - t_wait
            epoch_time += step_seconds
            state.train_seconds += step_seconds

            if state.step % cfg.train.log_every_steps == 0:
                values = {f"train/{k}": v for k, v in running.pop().items()}
                if not math.isfinite(values["train/loss"]):
                    raise FloatingPointError(f"loss became {values['train/loss']} before step {state.step}; lower train.lr")
            if state.step % cfg.train.log_every_steps == 0 and logger is not None:
                elapsed = time.perf_counter() - window_start
                values["throughput/samples_per_s"] = window_samples * world / max(elapsed, 1e-9)
                values["time/data_wait_fraction"] = data_wait / max(elapsed, 1e-9)
                values["lr"] = scheduler.get_last_lr()[0]
                values["epoch"] = epoch + state.batch / epoch_steps[epoch]
                logger.metrics(values, state.step)
                window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
            end_of_epoch = state.batch >= epoch_steps[epoch]
            if state.step % cfg.train.checkpoint_every_steps == 0 and not end_of_epoch and not done:
                report({"step": state.step, "epoch": epoch, "loss": float(loss.detach())}, with_checkpoint=True)
            t_wait = time.perf_counter()
            if done:
                break

        state.epoch, state.batch = epoch + 1, 0
        metrics: dict[str, float] = {"step": state.step, "epoch": epoch + 1, "loss": float(loss.detach()) if state.step else float("nan")}
        if evaluator is not None:
            metrics.update(evaluator.metrics(raw, device))
            metrics["throughput/epoch_samples_per_s"] = epoch_samples * world / max(epoch_time, 1e-9)
            if logger is not None:
                logger.metrics({k: v for k, v in metrics.items() if k not in ("step",)}, state.step)
                evaluator.log_figure(logger, raw, device, epoch, state.step, last=epoch + 1 == cfg.train.epochs or done)
            evaluator.print_epoch(metrics, epoch, state.step)
        if rank == 0 and (epoch + 1 == cfg.train.epochs or done):
            # Before the last report: a search's scheduler may end the trial as soon as it reports its last epoch.
            _export(cfg, config, raw, corpus, device, state, logger)
            exported = True
        report(metrics, with_checkpoint=True)

    if rank == 0 and not exported:  # nothing left to train (resumed after the last step)
        _export(cfg, config, raw, corpus, device, state, logger)


class EpochEvaluator:
    """What rank 0 measures at each epoch end: pretext losses on fixed validation clips, the quick
    probe, and the generated-frames figure."""

    def __init__(self, cfg: Config, corpus: Corpus, objective: Any) -> None:
        self.cfg, self.objective = cfg, objective
        rows = corpus.select("val", max_clips=64, seed=cfg.seed)
        self.val_batches = [b for _, b in iterate_rows(corpus, rows, cfg.data.batch_size, with_video=objective.visual)]
        self.figure_batch = self.val_batches[0] if objective.visual and self.val_batches else None
        self.probe = None
        if cfg.train.probe.enabled:
            from avssl.config.schema import probe_corpus
            from avssl.train.probe import QuickProbe

            p = cfg.train.probe
            self.probe = QuickProbe(Corpus(probe_corpus(cfg)), p.task, p.max_clips, cfg.seed, val_max_clips=p.val_max_clips, folds=p.folds)

    def metrics(self, raw: AVSSLModel, device: torch.device) -> dict[str, float]:
        out = _validation(raw, self.objective, self.val_batches, device, self.cfg.seed)
        if self.probe is not None:
            out.update(self.probe(raw.audio_encoder, device))
        return out

    def log_figure(self, logger: Any, raw: AVSSLModel, device: torch.device, epoch: int, step: int, last: bool) -> None:
        every = self.cfg.train.figure_every_epochs
        if self.figure_batch is not None and (last or (every and (epoch + 1) % every == 0)):
            figure = generated_frames_figure(raw, self.figure_batch, device, title=f"epoch {epoch + 1}, step {step}")
            logger.figure(figure, f"frames/epoch_{epoch + 1:03d}.png")

    def print_epoch(self, metrics: dict[str, float], epoch: int, step: int) -> None:
        parts_msg = ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in metrics.items() if k.startswith("val/loss/") and k.count("/") == 2)
        probe_msg = "".join(f" | {k.split('/')[-1]} {v:.3f}" for k, v in metrics.items() if k in ("probe/val_uar", "probe/val_ccc"))
        print(
            f"[avssl] epoch {epoch + 1}/{self.cfg.train.epochs} step {step}: train loss {metrics['loss']:.4f}"
            f" | val loss {metrics.get('val/loss', float('nan')):.4f}" + (f" ({parts_msg})" if parts_msg else "")
            + probe_msg + f" | {metrics['throughput/epoch_samples_per_s']:.1f} samples/s",
            flush=True,
        )


def _export(cfg: Config, config: dict[str, Any], raw: AVSSLModel, corpus: Corpus, device: torch.device, state: TrainState, logger: Any) -> None:
    """The trained encoder, with BatchNorm statistics of its final weights: written to a file (and
    to `encoder_dir`), logged as the run's artifact with the final metrics; the logger closed."""
    calib = [b["wave"] for _, b in iterate_rows(corpus, rows_for_pretraining(corpus, 1.0, cfg.seed, max_clips=256), 32)]
    recalibrate_batchnorm(raw.audio_encoder, calib, device)
    from avssl import scratch

    out = scratch.folder("encoder-") / ENCODER_FILE
    save_encoder(raw.audio_encoder, cfg.model.audio_encoder, out, extra={"step": state.step, "objective": cfg.objective.name, "run_name": cfg.run_name})
    if config.get("encoder_dir"):
        storage.write_bytes(storage.join(config["encoder_dir"], ENCODER_FILE), out.read_bytes())
    try:
        _log_export(cfg, logger, out, state)
    finally:
        import shutil

        shutil.rmtree(out.parent, ignore_errors=True)  # sent, copied to encoder_dir, or kept locally by the logger


def _log_export(cfg: Config, logger: Any, out: Path, state: TrainState) -> None:
    if logger is None:
        return
    logger.metrics({"final/steps": state.step, "final/samples_per_s": state.samples / max(state.train_seconds, 1e-9),
                    "final/restarts": state.restarts}, state.step)
    logger.artifact(out, "encoder")
    result = logger.close(timeout_s=max(30.0, 3 * cfg.tracking.connect_timeout_s))
    _write_tracking_status(storage.join(cfg.train.storage_path, str(cfg.run_name)), result)
    if result["lost"] or result["kept_locally"]:
        print(f"[avssl] MLflow: {result['lost']} metric values could not be sent; artifacts kept locally: {result['kept_locally']}", flush=True)
