"""One frozen config tree; its defaults are the reference recipe (He et al. 2015, section 4.2, plus the
project's warmup, label smoothing and random erasing: recipe "timm"). The key `recipe` picks a preset layer beneath
YAML files and `--set a.b=value`, which only override: defaults <- recipe preset <- YAML <- --set."""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ray_resnet.constants import DATASETS, TRAIN_IMAGES, parse_model_name
from ray_resnet.errors import ConfigError
from ray_resnet.io import storage

# Where decoded datasets are cached when data.cache_dir is null: $RAY_RESNET_CACHE, else this.
CACHE_ENV = "RAY_RESNET_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/ray_resnet"
_COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


@dataclass(frozen=True)
class Allowed:
    """A numeric key's allowed values as they read, `x` standing for the value: "x > 0", "0 <= x < 1"."""

    text: str

    def __post_init__(self):
        self.admits(0)  # a malformed range fails at import, not at a user's first run

    def admits(self, value: float) -> bool:
        left, _, right = self.text.partition("x")
        ok = math.isfinite(value)  # inf passes "x > 0" but breaks every step; nan compares false anyway
        if left.strip():
            bound, op = left.split()
            ok = ok and _COMPARE[op](float(bound), value)
        if right.strip():
            op, bound = right.split()
            ok = ok and _COMPARE[op](value, float(bound))
        return ok

    def describe(self, name: str) -> str:
        return self.text.replace("x", name)


def setting(default: Any, allowed: str | None = None, *, runtime: bool = False) -> Any:
    """A config field: its default, its allowed range (for a list: of each element), and whether it is a runtime
    key: one that says where and how a run happens (or how long), not what it computes, so it may change between a
    run and its resumption. Every other key is part of the recipe."""
    return field(default=default, metadata={"allowed": Allowed(allowed) if allowed else None, "runtime": runtime})


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal[DATASETS] = "cifar10"
    # parquet files (HuggingFace layout) or torchvision's cifar-10-batches-py; a local dir or a URI
    root: str = setting("data", runtime=True)
    download: bool = setting(False, runtime=True)  # fetch with torchvision's downloader when root holds nothing
    cache_dir: str | None = setting(None, runtime=True)  # decoded arrays; None: $RAY_RESNET_CACHE or ~/.cache/ray_resnet
    train_subset: int | None = setting(None, "x >= 1")  # class-balanced subset of the training set; None: all
    test_subset: int | None = setting(None, "x >= 1")
    erase_p: float = setting(0.25, "0 <= x <= 1")  # random erasing probability per image
    # Training images held out (class-balanced, drawn by seed) to select best/ on; None: best/ follows the test
    # set. train_subset then picks from the images that remain.
    val_split: int | None = setting(None, "x >= 1")
    # imagenet: /255, then ImageNet mean/std per channel. pixel_mean: /255, then minus the mean image [3,32,32] of
    # the run's training images (the paper's "per-pixel mean subtracted"; no std division).
    normalize: Literal["imagenet", "pixel_mean"] = "imagenet"


@dataclass(frozen=True)
class OptimConfig:
    lr: float = setting(0.1, "x > 0")
    momentum: float = setting(0.9, "0 <= x < 1")
    weight_decay: float = setting(1e-4, "x >= 0")
    nesterov: bool = False
    batch_size: int = setting(128, "x >= 1")  # global batch, split across all workers: the same recipe at any scale
    label_smoothing: float = setting(0.1, "0 <= x < 1")


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = setting(200, "x >= 1", runtime=True)  # raising it on a finished run trains on
    warmup_epochs: float = setting(10, "x >= 0")  # set per iteration, so it may end mid-epoch
    warmup_start_lr: float = setting(1e-5, "x >= 0")
    # linear: from warmup_start_lr up to optim.lr; constant: warmup_start_lr throughout, then optim.lr
    warmup: Literal["linear", "constant"] = "linear"
    # epochs where lr is multiplied by gamma; fractional ones fall mid-epoch (the paper's drops at 32k iterations)
    milestones: tuple[int | float, ...] = setting((100, 150), "x >= 1")
    gamma: float = setting(0.1, "0 < x <= 1")


@dataclass(frozen=True)
class PerfConfig:
    channels_last: bool = True  # 1.2-1.4x faster convolutions on CPU and on tensor-core GPUs
    # Training steps' precision. auto: bf16 autocast where the hardware multiplies bf16 natively (CUDA GPUs with
    # bf16, CPUs with AMX: 1.7x faster on a 2-core Xeon, bench/PRECISION.md), fp32 elsewhere. Evaluation is always
    # fp32.
    amp: Literal["auto", "fp32", "bf16"] = "auto"
    # larger batches overflow the CPU's L3 cache (2x slower per image at 1000)
    eval_batch_size: int = setting(500, "x >= 1")
    # torch.compile the training model. auto: on one CUDA worker, and on CPU where measured to pay (bf16 on a CPU
    # with AMX, runs of 5,000 steps or more: core.steps.compiles, bench/COMPILE.md); with several GPU workers
    # compile + DDP + BatchNorm has not run yet, and "on" is refused there. Off by default until the compiled GPU
    # path has been measured on a GPU (none was lent so far).
    compile: Literal["auto", "on", "off"] = "off"
    # with compile on one CUDA worker: mode "reduce-overhead" (replays the step's kernels as one graph)
    cuda_graphs: bool = False


@dataclass(frozen=True)
class RunConfig:
    name: str | None = None  # None: <model>-<dataset>-s<seed>; rerunning with the same name resumes
    storage: str = "runs"  # run dirs live in <storage>/<name>: a local path or a URI (s3://bucket/runs, gs://...)
    # N, or [min, max] for an elastic run: Ray Train starts as many as fit (up to max), goes on with fewer when
    # nodes are lost and grows again when they come back; the recipe (global batch included) stays the same.
    num_workers: int | tuple[int, ...] = setting(1, "x >= 1")
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: GPUs when the cluster has enough
    cpus_per_worker: int | None = setting(None, "x >= 1")  # None: on CPU all cluster CPUs split evenly, on GPU 1
    gpus_per_worker: float = setting(1.0, "x > 0")  # on GPU; 0.25 packs four small-ResNet workers on one GPU
    # An elastic run checks this often (seconds) whether the cluster has room for more workers; growing restarts
    # the workers from the latest checkpoint.
    resize_interval_s: float = setting(60.0, "x > 0")
    # A latest checkpoint is due every `checkpoint_every` epochs or `checkpoint_every_min` minutes since the previous
    # one (rank 0's clock), whichever comes first, and after the last epoch; neither set: every epoch. A killed run
    # trains again what it trained since its latest checkpoint: with minutes, up to that long (plus an epoch).
    # Short GPU epochs (1-2 s): minutes, e.g. 1, spare the per-epoch save and upload (docs/performance.md).
    checkpoint_every: int | None = setting(None, "x >= 1")  # epochs
    checkpoint_every_min: float | None = setting(None, "x > 0")  # minutes
    # Rank 0 logs the training loss and lr to TensorBoard every N optimizer steps (tb/steps). 50 steps take about
    # 15 s on 2 CPU cores at batch 128, so a CPU run shows its first points within a minute; on a GPU (~50x
    # faster) it costs one host sync per 50 steps.
    log_every_steps: int = setting(50, "x >= 1")
    keep_checkpoints: int = setting(2, "x >= 1")  # the latest K epoch checkpoints; the best one is kept apart
    # Worker-group restarts from the latest checkpoint before giving up; -1: no limit (Ray's convention).
    max_failures: int = setting(3, "x >= -1")
    # How long a rank waits in a collective (seconds) before its peer counts as hung and the workers restart from
    # the latest checkpoint (torch's default: 30 min). A healthy step's all-reduces take milliseconds; rank 0's
    # checkpoint upload happens outside them, in Ray's report.
    collective_timeout_s: float = setting(300.0, "x >= 10", runtime=True)
    # How long (seconds) each start or restart of a fixed-size run's worker group may wait for the cluster to place
    # its workers (nodes the autoscaler adds included) before the run stops in one line; Ray Train alone would wait
    # forever. An elastic run is left to Ray's elastic policy, which starts a group only once its minimum fits.
    start_timeout_s: float = setting(600.0, "x >= 1", runtime=True)
    # How workers spread over nodes (Ray placement group strategy); PACK fills one node first.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # The cluster adds nodes on demand (the cluster/ configs): skip the up-front "do the workers fit" check
    # and use GPUs unless device is cpu, since GPU nodes may not exist yet when the run starts.
    autoscaling: bool = False
    # MLflow tracking server (http://host:5000, a sqlite:/// or file: store); None: $MLFLOW_TRACKING_URI, else off
    mlflow: str | None = setting(None, runtime=True)
    mlflow_experiment: str = setting("ray-resnet", runtime=True)

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers: (N, N) for a fixed-size run."""
        workers = self.num_workers
        return (workers, workers) if isinstance(workers, int) else (workers[0], workers[-1])

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)

    @property
    def workers_text(self) -> str:
        """run.num_workers as a user writes it: 4, or [1, 4]."""
        return str(list(self.num_workers) if self.elastic else self.num_workers)


@dataclass(frozen=True)
class Config:
    model: str = "resnet20"
    # The preset beneath the other keys (see RECIPES): timm (these defaults), paper (He et al. 2015, section 4.2),
    # reproduction (akamaster/pytorch_resnet_cifar10, the most used PyTorch reproduction).
    recipe: Literal["timm", "paper", "reproduction"] = "timm"
    seed: int = setting(0, "x >= 0")  # fixes init, data order and augmentation
    # With several workers, what BatchNorm normalises over. global: the whole global batch, with the same running
    # statistics on every rank, so a run trains alike at any worker count. per_worker: each worker's share (DDP's
    # default; the paper's 2-GPU runs normalised over 64 images per GPU). One worker: the same either way.
    batchnorm: Literal["global", "per_worker"] = "global"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    perf: PerfConfig = field(default_factory=PerfConfig, metadata={"runtime": True})
    run: RunConfig = field(default_factory=RunConfig, metadata={"runtime": True})


def cache_dir(configured: str | None) -> Path:
    """The decoded-dataset cache: data.cache_dir, else $RAY_RESNET_CACHE, else ~/.cache/ray_resnet (absolute)."""
    return Path(configured or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser().resolve()


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else tp.__name__


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; return it in canonical form or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
    elif origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in typing.get_args(tp):
            return "on" if value else "off"  # YAML 1.1 reads `on` / `off` as booleans
        if value in typing.get_args(tp):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, typing.get_args(tp)[0], key) for v in value)
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, overrides: dict, prefix: str = "") -> Any:
    return cls(**_checked(cls, overrides, prefix))


def _checked(cls: type, overrides: dict, prefix: str) -> dict:
    """`overrides` of dataclass `cls`'s fields, each checked against its type and allowed range (nested sections
    built)."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {overrides!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}'; valid keys: {', '.join(prefix + k for k in fields)}")
    kwargs = {}
    for name, value in overrides.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _in_range(_coerce(value, tp, prefix + name), fields[name].metadata.get("allowed"),
                                     prefix + name)
    return kwargs


def _in_range(value: Any, allowed: Allowed | None, key: str) -> Any:
    for element in value if isinstance(value, tuple) else [value]:
        if allowed and element is not None and not allowed.admits(element):
            name = key.rsplit(".", 1)[-1]
            what = f"{list(value)} holds {element!r}, but each value must satisfy" if isinstance(value, tuple) else \
                f"{element!r} is out of range: it must satisfy"
            raise ConfigError(f"{key}: {what} {allowed.describe(name)}")
    return value


# A run or sweep name is one directory under its storage: never a path that leaves it (`../x`, `/abs`), a hidden
# or special entry (`.`, `..`), or a URI's query (`?`) or fragment (`#`). Sweep trial names fit it too.
SAFE_NAME = re.compile(r"[A-Za-z0-9_=,+@()\[\]-][A-Za-z0-9._=,+@()\[\]-]{0,199}")


def check_name(key: str, name: Any) -> str:
    """`name`, if it is one safe path segment; else a ConfigError naming `key`."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ConfigError(f"{key}={name!r} is not one safe path segment: use letters, digits and . _ - = , + @ ( ) "
                          "[ ] (at most 200, not starting with a dot), e.g. resnet20-lr0.05")
    return name


def _check_rules(cfg: Config) -> None:
    """The rules that tie keys together; every broken one is named in one error."""
    if cfg.run.name is not None:
        check_name("run.name", cfg.run.name)
    if cfg.run.elastic and (len(cfg.run.num_workers) != 2 or cfg.run.num_workers[0] > cfg.run.num_workers[1]):
        raise ConfigError(f"run.num_workers={cfg.run.workers_text}: an elastic run takes [min, max] with "
                          "min <= max, e.g. [1, 4]")
    s, (_, workers) = cfg.schedule, cfg.run.worker_range
    broken = []
    if s.warmup_epochs > s.epochs:
        broken.append(f"schedule.warmup_epochs={s.warmup_epochs:g} is longer than schedule.epochs={s.epochs}")
    if any(b <= a for a, b in zip(s.milestones, s.milestones[1:])):
        broken.append(f"schedule.milestones={list(s.milestones)} must increase strictly")
    if any(m > s.epochs for m in s.milestones):
        broken.append(f"schedule.milestones={list(s.milestones)} lie beyond schedule.epochs={s.epochs}, so the lr "
                      "would never drop there (set them for this run's length, or [] for none)")
    if cfg.optim.batch_size < workers:
        broken.append(f"optim.batch_size={cfg.optim.batch_size} is the global batch, split across "
                      f"{_workers_named(cfg)}: each worker needs at least one image")
    if cfg.perf.cuda_graphs and workers > 1:
        broken.append(f"perf.cuda_graphs=true with {_workers_named(cfg)}: CUDA graphs replay one process's kernels "
                      "and skip the graphs of a DDP step with BatchNorm (its buffers mutate); set "
                      "perf.cuda_graphs=false for several workers")
    broken += split_problems(cfg, TRAIN_IMAGES[cfg.data.dataset], f"in {cfg.data.dataset}")
    if broken:
        raise ConfigError("; ".join(broken))


def _workers_named(cfg: Config) -> str:
    most = cfg.run.worker_range[1]
    return f"run.num_workers={cfg.run.workers_text}" + (f" (up to {most})" if cfg.run.elastic else "")


def split_problems(cfg: Config, num_train: int, source: str) -> list[str]:
    """Why the run's training images would not reach every worker, given `num_train` training images `source`
    ("in cifar10": the dataset's size, while the config is checked; "under <root>": the real count, once loaded)."""
    workers, named = cfg.run.worker_range[1], _workers_named(cfg)
    val, subset = cfg.data.val_split or 0, cfg.data.train_subset
    if val and val >= num_train:
        return [f"data.val_split={val} holds out all {num_train:,} training images {source}: hold out fewer "
                "(the paper: 5000)"]
    if val and val > num_train - workers:
        return [f"data.val_split={val} leaves fewer training images than {named} workers of the {num_train:,} "
                f"{source}: hold out fewer (the paper: 5000)"]
    if subset is not None and subset < workers:
        return [f"data.train_subset={subset} gives some of the {named} workers no training image"]
    used = min(subset or num_train - val, num_train - val)
    if used < workers:
        return [f"{used} training images cannot be split across {named} workers: use fewer workers or more data"]
    return []


# He et al. (2015), section 4.2, in iterations of the batch of 128: lr / 10 at 32k and 48k, stop at 64k; the deepest
# nets start at lr 0.01 "until the training error is below 80% (about 400 iterations)".
PAPER_MILESTONES_IT = (32_000, 48_000)
PAPER_STOP_IT = 64_000
PAPER_WARMUP_IT = 400
WARMUP_LR = 0.01  # paper and reproduction: the start lr of ResNet-110 and ResNet-1202 (depth >= 110 here)
DEEP = 110


def train_images(cfg: Config) -> int:
    """The training images a run uses of the full dataset: all but the val split, at most data.train_subset."""
    left = TRAIN_IMAGES[cfg.data.dataset] - (cfg.data.val_split or 0)
    return min(left, cfg.data.train_subset or left)


def recipe_preset(cfg: Config) -> dict:
    """The overrides recipe `cfg.recipe` lays beneath the YAML/--set ones. They depend on cfg's model (warmup for the
    deepest nets) and, for the paper's iteration counts, on the steps per epoch: ceil(train_images / batch)."""
    if cfg.recipe == "timm":
        return {}
    deep = parse_model_name(cfg.model)[0] >= DEEP
    plain = {"data": {"erase_p": 0.0, "normalize": "imagenet"}, "optim": {"label_smoothing": 0.0},
             "schedule": {"warmup": "constant", "warmup_start_lr": WARMUP_LR}}
    if cfg.recipe == "reproduction":  # lr 0.01 for the first epoch of resnet110/1202 (its trainer.py)
        return merge(plain, {"schedule": {"epochs": 200, "milestones": [100, 150], "warmup_epochs": 1 if deep else 0}})
    steps = math.ceil(train_images(cfg) / cfg.optim.batch_size)
    return merge(plain, {"data": {"normalize": "pixel_mean"}, "schedule": {
        "epochs": math.ceil(PAPER_STOP_IT / steps), "milestones": [it / steps for it in PAPER_MILESTONES_IT],
        "warmup_epochs": PAPER_WARMUP_IT / steps if deep else 0}})


def merge(base: dict, overrides: dict) -> dict:
    """A copy of nested dict `base` with `overrides` applied key by key (sub-dicts merge, other values replace)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dict(cfg: Config) -> dict:
    """Plain, YAML-ready dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return plain(dataclasses.asdict(cfg))


def flatten(nested: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}"""
    out = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def nest(dotted: dict) -> dict:
    """{"optim.lr": 0.1} -> {"optim": {"lr": 0.1}} (the inverse of flatten)"""
    out: dict = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


@functools.cache
def runtime_keys(cls: type | None = None, prefix: str = "", inherited: bool = False) -> frozenset[str]:
    """Dotted keys marked runtime, or inside a section marked so."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        key, marked = prefix + f.name, inherited or f.metadata.get("runtime", False)
        if dataclasses.is_dataclass(hints[f.name]):
            out |= runtime_keys(hints[f.name], key + ".", marked)
        elif marked:
            out.add(key)
    return frozenset(out)


def recipe_changes(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every recipe key whose value differs (runtime keys may differ)."""
    a, b, free = flatten(old), flatten(new), runtime_keys()
    return sorted(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in a.keys() | b.keys()
                  if a.get(k) != b.get(k) and k not in free)


def from_dict(d: dict, rules: bool = True) -> Config:
    """The config `d` overrides, checked key by key and (with `rules`) against the rules that tie keys together."""

    cfg = _build(Config, d)
    _check_model_name(cfg.model)
    if cfg.recipe != "timm":  # the preset depends on keys `d` may set (model, data.val_split, ...): built again
        cfg = _build(Config, merge(recipe_preset(cfg), d))
    if rules:
        _check_rules(cfg)
    return cfg


def _check_model_name(name: str) -> None:
    try:
        parse_model_name(name)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def parse_set(assignment: str) -> dict:
    """`optim.lr=0.05` -> {"optim": {"lr": 0.05}}; the value is read as YAML (numbers, lists, null, true)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (e.g. optim.lr=0.05), got {assignment!r}")
    value: Any = yaml.safe_load(raw) if raw.strip() else ""
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def load_config(path: str | Path | None = None, sets: list[str] = (), extra: dict | None = None) -> Config:
    """Defaults <- YAML file <- `extra` (from CLI flags) <- `--set` assignments, validated as a whole."""
    overrides: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; the shipped ones are in configs/")
        try:
            overrides = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}".splitlines()[0]) from None
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    overrides = merge(overrides, extra or {})
    for assignment in sets:
        overrides = merge(overrides, parse_set(assignment))
    try:
        return from_dict(overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def read_config(location: str) -> Config:
    """A config a run saved (its config.yaml, local or a URI). The rules between keys are those of the version that
    wrote it, so only keys and values are checked: a run dir stays readable after an upgrade."""
    return saved_config(storage.read_bytes(location), location)


def saved_config(data: bytes, location: str) -> Config:
    """The config in a saved config.yaml's bytes, read from `location` (which an error names), checked as by
    read_config."""
    try:
        return from_dict(yaml.safe_load(data.decode()) or {}, rules=False)
    except (yaml.YAMLError, UnicodeDecodeError, ConfigError) as e:
        raise ConfigError(f"cannot read the saved config {location} ({str(e).splitlines()[0][:200]}); move it "
                          "aside or pass another --name") from None


def save_config(cfg: Config, location: str | Path) -> None:
    storage.write_text(location, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: Config, **changes: Any) -> Config:
    """`replace(cfg, model="resnet32", run={"name": "x"})`: a copy with some top-level keys and some keys of some
    sections changed, each checked as in a YAML file, and the rules that tie keys together checked again."""
    changed = {}
    for name, value in changes.items():
        section = getattr(cfg, name, None)
        if dataclasses.is_dataclass(section):
            changed[name] = dataclasses.replace(section, **_checked(type(section), value, f"{name}."))
        else:
            changed.update(_checked(Config, {name: value}, ""))
    out = dataclasses.replace(cfg, **changed)
    _check_model_name(out.model)
    _check_rules(out)
    return out
