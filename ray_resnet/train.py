"""The Ray edge of training: the per-worker loop under `TorchTrainer`, and the driver that starts it.

Run dir layout (`<run.storage>/<name>/`): `config.yaml` (resolved config), Ray Train's `checkpoint_*` dirs
(the latest `run.keep_checkpoints`), `best/checkpoint.pt`, `tb/` (TensorBoard, rank 0), `result.json` (driver).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from . import config as config_lib
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import Config
from .data import NUM_CLASSES, epoch_batches, eval_shard, load_cifar, take_subset
from .engine import compile_model, evaluate, make_optimizer, make_scheduler, train_one_epoch
from .failures import RunError, check_storage, diverged_error, fit_or_explain
from .models import build_model, count_parameters, parse_model_name

# report() waits up to this long for the controller's poll (Ray's default 2 s); printing is done by rank 0 itself.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else every worker print() shows up twice

# Config keys that may change between a run and its resumption: where and how it runs, and how long.
RESUMABLE_CHANGES = {"run", "perf", "schedule.epochs"}


def default_run_name(cfg: Config) -> str:
    return f"{cfg.model}-{cfg.data.dataset}-s{cfg.seed}"


def load_splits(cfg: Config) -> dict[str, np.ndarray]:
    """Decoded uint8 arrays (subsets applied), as numpy so ray.put shares them zero-copy between workers."""
    out = {}
    for split, subset in (("train", cfg.data.train_subset), ("test", cfg.data.test_subset)):
        images, labels = load_cifar(cfg.data.root, split, cfg.data.dataset, cfg.data.download, cfg.data.cache_dir)
        keep = take_subset(labels, subset, cfg.seed)
        out[f"{split}_images"], out[f"{split}_labels"] = images[keep].numpy(), labels[keep].numpy()
    return out


def _as_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():  # arrays from the object store are read-only; we only ever index them
        warnings.simplefilter("ignore", UserWarning)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}


def _epoch_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """Augmentation randomness depends only on (seed, epoch, rank): a resumed run draws what it would have."""
    state = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(state)


def _hms(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _log_epoch(writer, metrics: dict, epoch: int) -> None:
    for tag, key in (("train/loss", "train_loss"), ("train/acc", "train_acc"), ("test/loss", "test_loss"),
                     ("test/acc", "test_acc"), ("lr", "lr"), ("perf/train_images_per_s", "train_images_per_s"),
                     ("perf/epoch_time_s", "epoch_time_s")):
        writer.add_scalar(tag, metrics[key], epoch)
    writer.flush()


def _log_hparams(writer, cfg: Config, params: int, metrics: dict, extra: dict) -> None:
    from torch.utils.tensorboard.summary import hparams

    depth, shortcut = parse_model_name(cfg.model)
    hp = {"model": cfg.model, "depth": depth, "shortcut": str(shortcut), "params": params, "seed": cfg.seed,
          "dataset": cfg.data.dataset, "lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay,
          "batch_size": cfg.optim.batch_size, "epochs": cfg.schedule.epochs, "num_workers": cfg.run.num_workers,
          **extra}
    results = {"hparam/final_test_acc": metrics["test_acc"], "hparam/best_test_acc": metrics["best_test_acc"]}
    for summary in hparams(hp, results):
        writer.file_writer.add_summary(summary)
    for tag, value in results.items():
        writer.add_scalar(tag, value, metrics["epoch"])
    writer.flush()


def train_loop_per_worker(loop_config: dict) -> dict | None:
    """Runs on every Ray Train worker. Every rank calls `ray.train.report` once per epoch.

    Returns {"loss", "epoch"} if the loss became NaN/inf (every rank sees the same all-reduced loss, so all
    return together): an exception would make Ray Train retry `max_failures` times for nothing.
    """
    cfg = config_lib.from_dict(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(loop_config["threads"])
    # At INFO these repeat every report's metrics dict and checkpoint path; rank 0 prints its own epoch line.
    # (The controller's logs, e.g. why a worker group was restarted, stay at INFO.)
    for module in ("context", "storage"):  # Ray-internal modules, already imported in a worker; absent: no-op
        logger = getattr(sys.modules.get(f"ray.train.v2._internal.execution.{module}"), "logger", None)
        if logger:
            logger.setLevel(logging.WARNING)

    data = _as_tensors(ray.get(loop_config["data"]))
    if device.type == "cuda":  # the whole uint8 set fits on the GPU (150 MB): no per-step host transfers
        data = {k: v.to(device) for k, v in data.items()}
        torch.backends.cudnn.benchmark = True  # fixed 32x32 shapes: pick the fastest conv kernels once
    train_images, train_labels = data["train_images"], data["train_labels"]
    test_images, test_labels = data["test_images"], data["test_labels"]

    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    model = build_model(cfg.model, NUM_CLASSES[cfg.data.dataset])
    params = count_parameters(model)
    if cfg.perf.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    core = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    steps_per_epoch = len(epoch_batches(len(train_labels), cfg.optim.batch_size, world, rank, 0, cfg.seed))
    train_model = compile_model(model, device, cfg.perf.compile, cfg.perf.cuda_graphs)
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim.lr, cfg.schedule, steps_per_epoch)

    start_epoch, best_acc, best_epoch = 0, 0.0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        start_epoch, best_acc, best_epoch = state["epoch"], state["best_test_acc"], state["best_epoch"]
        if rank == 0:
            print(f"resuming from the checkpoint of epoch {start_epoch}", flush=True)
    nodes = [ray.get_runtime_context().get_node_id()] * world
    if world > 1:  # recorded in the metrics: which Ray node each rank ran on
        dist.all_gather_object(nodes, nodes[0])

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events a crashed attempt logged after the checkpoint we resume from (all of them
        # when it crashed before its first checkpoint was committed).
        writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_epoch + 1)
    test_shard = eval_shard(len(test_labels), world, rank)
    epochs = cfg.schedule.epochs
    for epoch in range(start_epoch, epochs):
        epoch_start = time.perf_counter()
        steps = epoch_batches(len(train_labels), cfg.optim.batch_size, world, rank, epoch, cfg.seed)
        train = train_one_epoch(
            train_model, optimizer, scheduler, train_images, train_labels, steps,
            _epoch_generator(cfg.seed, epoch, rank, train_images.device),
            label_smoothing=cfg.optim.label_smoothing, erase_p=cfg.data.erase_p,
            channels_last=cfg.perf.channels_last, amp=cfg.perf.amp, world_size=world,
        )
        if world > 1:  # evaluate rank 0's BN statistics everywhere: the ones the checkpoint holds
            for buffer in core.buffers():
                dist.broadcast(buffer, 0)
        test = evaluate(core, test_images, test_labels, test_shard, batch_size=cfg.perf.eval_batch_size,
                        channels_last=cfg.perf.channels_last, amp=cfg.perf.amp)
        done = epoch + 1
        if not math.isfinite(train["loss"]):
            if writer:
                writer.close()
            return {"loss": train["loss"], "epoch": done}
        is_best = test["acc"] > best_acc
        if is_best:
            best_acc, best_epoch = test["acc"], done
        metrics = {
            "epoch": done, "train_loss": train["loss"], "train_acc": train["acc"], "test_loss": test["loss"],
            "test_acc": test["acc"], "best_test_acc": best_acc, "best_epoch": best_epoch, "lr": train["lr"],
            "train_images_per_s": train["images_per_s"], "test_images_per_s": test["images_per_s"],
            "epoch_time_s": time.perf_counter() - epoch_start, "worker_nodes": nodes,
        }
        save_due = done % cfg.run.checkpoint_every == 0 or done == epochs
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0 and (save_due or is_best):
                state = {
                    "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": done, "best_test_acc": best_acc,
                    "best_epoch": best_epoch, "rng": {"torch": torch.get_rng_state()},
                    "config": loop_config["config"], "metrics": metrics,
                }
                if save_due:
                    save_checkpoint(state, tmp)
                if is_best:
                    save_checkpoint(state, run_dir / "best")
            if writer:
                _log_epoch(writer, metrics, done)
                print(f"epoch {done:>3}/{epochs}  train loss {train['loss']:.3f} acc {train['acc']:5.2f}%  "
                      f"test loss {test['loss']:.3f} acc {test['acc']:5.2f}%  lr {train['lr']:.4g}  "
                      f"{train['images_per_s']:,.0f} img/s  {metrics['epoch_time_s']:.0f}s  "
                      f"ETA {_hms(metrics['epoch_time_s'] * (epochs - done))}", flush=True)
            ray_checkpoint = ray.train.Checkpoint.from_directory(tmp) if save_due and rank == 0 else None
            ray.train.report(metrics, checkpoint=ray_checkpoint)
    if writer:
        if start_epoch < epochs:
            _log_hparams(writer, cfg, params, metrics, loop_config.get("hparams", {}))
        writer.close()
    return None


def _config_changes(old: dict, new: dict) -> list[str]:
    """Keys whose values differ, apart from those a resumed run may change."""
    a, b = config_lib.flatten(old), config_lib.flatten(new)
    return sorted(
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in a.keys() | b.keys()
        if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES and k.split(".")[0] not in RESUMABLE_CHANGES
    )


def resolve_run(cfg: Config) -> Config:
    """Fill in the run name and make paths absolute, so the saved config reruns from anywhere."""
    check_storage(cfg.run.storage)
    return config_lib.replace(cfg, data={"root": str(Path(cfg.data.root).expanduser().resolve())},
                              run={"name": cfg.run.name or default_run_name(cfg),
                                   "storage": str(Path(cfg.run.storage).expanduser().resolve())})


def previous_result(cfg: Config) -> dict | None:
    """The finished result of this run name, if it is finished; raises if the run dir holds another recipe."""
    run_dir = Path(cfg.run.storage) / cfg.run.name
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return None
    import yaml

    old = config_lib.to_dict(config_lib.from_dict(yaml.safe_load(saved.read_text()) or {}))
    changes = _config_changes(old, config_lib.to_dict(cfg))
    if changes:
        raise RunError(f"run dir {run_dir} holds a run with another config ({'; '.join(changes[:4])}); "
                       "pass a new --name, or delete that dir to start over")
    result_file = run_dir / "result.json"
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        if result.get("epoch", 0) >= cfg.schedule.epochs:
            return result
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint Ray Train will resume from: the latest one its snapshot file has committed."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return None
    latest = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    return run_dir / latest if latest else None


def check_resumable(run_dir: Path) -> int:
    """Epoch of the checkpoint a rerun resumes from (0: none); a corrupt one stops here, not in N retries."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return 0
    try:
        return load_checkpoint(path)["epoch"]
    except CheckpointError as e:
        raise RunError(f"cannot resume {run_dir.name}: {e}. Move that checkpoint dir aside to resume from an "
                       "older one, or pass --name for a fresh run") from None


def connect(address: str | None) -> None:
    """Join `address` (or $RAY_ADDRESS, which `ray job submit` sets), else start a local embedded Ray."""
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local")


def plan_resources(cfg: Config) -> tuple[bool, dict[str, float], int]:
    """(use_gpu, resources per worker, torch threads per worker); fails at once if the workers cannot fit.

    Ray Train would otherwise wait forever for a worker group the cluster can never place.
    """
    if cfg.run.autoscaling:  # the nodes come when the workers ask; Ray Train waits for them
        use_gpu = cfg.run.device != "cpu"
        bundle = {"CPU": cfg.run.cpus_per_worker or 1, **({"GPU": 1} if use_gpu else {})}
        return use_gpu, bundle, int(bundle["CPU"])
    total = ray.cluster_resources()
    num_workers = cfg.run.num_workers
    use_gpu = cfg.run.device == "cuda" or (cfg.run.device == "auto" and total.get("GPU", 0) > 0)
    if use_gpu:
        bundle = {"CPU": cfg.run.cpus_per_worker or 1, "GPU": cfg.run.gpus_per_worker}
    else:
        bundle = {"CPU": cfg.run.cpus_per_worker or max(1, int(total.get("CPU", 1)) // num_workers)}
    places = worker_slots(bundle)
    if places < num_workers:
        have = ", ".join(f"{k}={total.get(k, 0):g}" for k in bundle)
        nodes = sum(1 for node in ray.nodes() if node["Alive"])
        raise RunError(f"{num_workers} worker(s) x {bundle} do not fit on this cluster ({have} over {nodes} "
                       f"node(s); room for {places}): lower --num-workers or run.cpus_per_worker, or add nodes")
    return use_gpu, bundle, int(bundle["CPU"])


def worker_slots(bundle: dict[str, float]) -> int:
    """How many workers of `bundle` the cluster's live nodes can hold at once (a worker never spans nodes)."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    return sum(min(int(node.get(k, 0) // v) for k, v in bundle.items()) for node in nodes)


def run_training(cfg: Config, address: str | None = None, callbacks: list | None = None,
                 hparams: dict | None = None) -> dict:
    """Train (or resume) the run `cfg.run.name`; returns the summary also written to result.json.

    `callbacks`: Ray Train user callbacks (a sweep trial forwards reports to Tune); `hparams`: extra entries of the
    TensorBoard HParams record (a sweep trial's swept keys).
    """
    cfg = resolve_run(cfg)
    run_dir = Path(cfg.run.storage) / cfg.run.name
    finished = previous_result(cfg)
    if finished:
        return {**finished, "already_finished": True}
    resume_epoch = check_resumable(run_dir)
    if resume_epoch:
        print(f"resuming run {cfg.run.name} from its epoch-{resume_epoch} checkpoint ({run_dir})", flush=True)
    arrays = load_splits(cfg)  # bad data paths fail here, before any Ray process starts
    connect(address)
    use_gpu, bundle, threads = plan_resources(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_lib.save_config(cfg, run_dir / "config.yaml")
    start = time.perf_counter()
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config_lib.to_dict(cfg), "run_dir": str(run_dir),
                           "data": ray.put(arrays), "threads": threads, "hparams": hparams or {}},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=bundle,
                                               placement_strategy=cfg.run.placement_strategy),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=cfg.run.storage, callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
        ),
    )
    result = fit_or_explain(trainer, cfg.run.max_failures)
    metrics = result.metrics or {}
    if result.return_value:  # diverged: no result.json, the run is not finished
        raise diverged_error(result.return_value, result.checkpoint.path if result.checkpoint else None,
                             metrics.get("epoch", 0))
    summary = {
        "name": cfg.run.name, "model": cfg.model, "dataset": cfg.data.dataset, "seed": cfg.seed,
        "params": count_parameters(build_model(cfg.model, NUM_CLASSES[cfg.data.dataset])),
        "epoch": metrics.get("epoch", 0), "epochs": cfg.schedule.epochs,
        "final_test_acc": metrics.get("test_acc"), "best_test_acc": metrics.get("best_test_acc"),
        "best_epoch": metrics.get("best_epoch"), "wall_time_s": round(time.perf_counter() - start, 1),
        "run_dir": str(run_dir), "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "best_checkpoint": str(run_dir / "best"),
    }
    # One line: in a sweep the run dir is also the Tune trial dir, whose result.json Tune reads as JSON lines.
    (run_dir / "result.json").write_text(json.dumps(summary) + "\n")
    return summary
