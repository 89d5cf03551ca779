"""The Ray Tune edge: a sweep file becomes a Tune run whose trials each train through `train.run_training`.

A sweep file (configs/sweep_*.yaml) holds:
  name, storage   the sweep dir is <storage>/<name> (default runs/sweeps/<file stem without "sweep_">)
  config          overrides of the reference recipe shared by every trial, as in a config YAML
  grid            dotted config key -> list of values; every combination is a trial
  search          dotted config key -> {uniform|loguniform|randint: [low, high]} or {choice: [...]}
  num_samples     draws of `search` per grid point (default 1)
  scheduler       {asha: {grace_period: epochs, reduction_factor: r}}: stop weak trials early on validation
                  accuracy (test accuracy unless every trial sets data.val_split)
  resources       workers_per_trial, cpus_per_worker, gpus_per_worker (fractions share a GPU), max_concurrent_trials

Every trial is one Ray Train run (config.yaml, checkpoints, best/, tb/, result.json) in <sweep dir>/<trial name>/,
the same dir Tune keeps the trial's progress.csv in, so `tensorboard --logdir <sweep dir>` shows one run per trial.
Tune's own JSON and TensorBoard loggers are off: they would write a second result.json and TensorBoard run there.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune

from ray_resnet import config as config_lib
from ray_resnet.config import Config, flatten, merge, nest
from ray_resnet.constants import CONFIG_FILE, SWEEP_FILE
from ray_resnet.errors import (
    ConfigError,
    DirInUseError,
    DivergedError,
    RunError,
    SweepError,
    UserError,
    WorkersNotStartedError,
)
from ray_resnet.io import lease, storage, tracking
from ray_resnet.io.rundir import (
    SNAPSHOT_FILE,
    RunResult,
    committed_epoch,
    read_result,
    resolve_run,
    run_dir,
    trial_dirs,
    write_config,
    write_result,
)

MODE = "max"  # of the metric trials are compared on (see tune_metric)
TOP_KEYS = ("name", "storage", "config", "grid", "search", "num_samples", "scheduler", "resources")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
ASHA_KEYS = ("grace_period", "reduction_factor")
# resources key -> the config key it sets in every trial
RESOURCE_KEYS = {"workers_per_trial": "run.num_workers", "cpus_per_worker": "run.cpus_per_worker",
                 "gpus_per_worker": "run.gpus_per_worker", "max_concurrent_trials": None}
NAMED_PER_TRIAL = ("run.name", "run.storage")  # the sweep sets these for every trial


@dataclass(frozen=True)
class Sweep:
    name: str
    storage: str  # an absolute path or a URI
    base: dict  # config overrides shared by all trials (resources and run paths included)
    grid: dict  # dotted key -> list of values
    search: dict  # dotted key -> {distribution: args}
    num_samples: int
    asha: dict | None
    max_concurrent_trials: int | None
    configs: tuple[Config, ...] = ()  # one per grid point, sampled keys at their first bound: built and checked once

    @property
    def dir(self) -> str:
        return storage.join(self.storage, self.name)

    @property
    def swept(self) -> list[str]:
        return [*self.grid, *self.search]

    def as_dict(self) -> dict:
        return {"name": self.name, "storage": self.storage, "config": self.base, "grid": self.grid,
                "search": self.search, "num_samples": self.num_samples,
                "scheduler": {"asha": self.asha} if self.asha else None,
                "resources": {"max_concurrent_trials": self.max_concurrent_trials}}


def trial_config(sweep: Sweep, values: dict) -> Config:
    """The config of the trial with swept `values` (dotted key -> value); raises ConfigError naming the key."""
    return config_lib.from_dict(merge(sweep.base, nest(values)))


def _check_key(sweep_base: dict, key: Any, value: Any, where: str) -> None:
    if not isinstance(key, str) or not key:
        raise SweepError(f"{where}: expected dotted config keys (e.g. optim.lr), got {key!r}")
    if key in NAMED_PER_TRIAL:
        raise SweepError(f"{where}.{key}: the sweep names and places every trial itself; sweep other keys")
    try:
        config_lib.from_dict(merge(sweep_base, nest({key: value})))
    except ConfigError as e:
        raise SweepError(f"{where}.{key}: {e}") from None


def _mapping(raw: dict, key: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise SweepError(f"{key}: expected a mapping, got {value!r}")
    return value


def _parse_search(base: dict, search: dict) -> dict:
    for key, spec in search.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise SweepError(f"search.{key}: expected one of {{{', '.join(d + ': ...' for d in DISTRIBUTIONS)}}}, "
                             f"got {spec!r}")
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise SweepError(f"search.{key}.choice: expected a non-empty list of values, got {args!r}")
        else:
            if not (isinstance(args, list) and len(args) == 2):
                raise SweepError(f"search.{key}.{kind}: expected [low, high], got {args!r}")
            try:  # Tune draws floats, except randint; YAML 1.1 reads 1e-4 (no dot) as a string
                args = [(int if kind == "randint" else float)(a) for a in args]
            except (TypeError, ValueError):
                raise SweepError(f"search.{key}.{kind}: expected numbers [low, high], got {args!r}") from None
            if args[0] >= args[1]:
                raise SweepError(f"search.{key}.{kind}: expected low < high, got {args!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise SweepError(f"search.{key}.loguniform: low must be > 0, got {args[0]}")
            search[key] = {kind: args}
        for value in args:  # both bounds (or every choice) must be valid values of the key
            _check_key(base, key, value, "search")
    return search


def load_sweep(path: str | Path, sets: list[str] = (), extra: dict | None = None, name: str | None = None,
               storage: str | None = None) -> Sweep:
    """Read and validate a sweep file; `sets`/`extra` override its `config:` like `ray-resnet train --set`."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} not found; the shipped ones are configs/sweep_*.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SweepError(f"{path} is not valid YAML: {e}".splitlines()[0]) from None
    try:
        return _parse(raw, path, sets, extra or {}, name, storage)
    except (SweepError, ConfigError) as e:
        raise SweepError(f"{path}: {e}") from None


def _parse_base(raw: dict, sets, extra: dict) -> dict:
    """The config overrides every trial shares: the file's config:, --set, and what resources: sets."""
    base = merge(_mapping(raw, "config"), extra)
    for assignment in sets:
        base = merge(base, config_lib.parse_set(assignment))
    resources = _mapping(raw, "resources")
    unknown = sorted(set(resources) - set(RESOURCE_KEYS))
    if unknown:
        raise SweepError(f"unknown key 'resources.{unknown[0]}'; valid keys: "
                         + ", ".join(f"resources.{k}" for k in RESOURCE_KEYS))
    for key, config_key in RESOURCE_KEYS.items():
        if config_key and key in resources:
            base = merge(base, nest({config_key: resources[key]}))
    for key in NAMED_PER_TRIAL:
        if flatten(base).get(key) is not None:
            raise SweepError(f"config.{key}: the sweep names and places every trial itself; "
                             "set the sweep's name/storage (or --name/--storage) instead")
    return base


def _parse(raw: Any, path: Path, sets, extra: dict, name: str | None, storage_root: str | None) -> Sweep:
    if not isinstance(raw, dict):
        raise SweepError("expected a mapping with keys " + ", ".join(TOP_KEYS))
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise SweepError(f"unknown key '{unknown[0]}'; valid keys: {', '.join(TOP_KEYS)}")
    base = _parse_base(raw, sets, extra)
    base_cfg = config_lib.from_dict(base)  # names the bad key; also checks the resources' types
    # Resolved here, so every trial process reads the one dataset and cache, whatever its cwd and environment.
    base = merge(base, {"data": {"root": storage.absolute(base_cfg.data.root),
                                 "cache_dir": str(config_lib.cache_dir(base_cfg.data.cache_dir))}})
    max_concurrent = _mapping(raw, "resources").get("max_concurrent_trials")
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
        raise SweepError(f"resources.max_concurrent_trials: expected an int >= 1 or null, got {max_concurrent!r}")

    grid = _parse_grid(base, _mapping(raw, "grid"))
    search = _parse_search(base, dict(_mapping(raw, "search")))
    both = sorted(set(grid) & set(search))
    if both:
        raise SweepError(f"{both[0]} is in both grid and search; sweep each key in one of them")

    num_samples = raw.get("num_samples", 1)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise SweepError(f"num_samples: expected an int >= 1, got {num_samples!r}")
    asha = _parse_scheduler(raw.get("scheduler"))

    sweep = Sweep(name=config_lib.check_name("name", name or raw.get("name") or path.stem.removeprefix("sweep_")),
                  storage=storage.absolute(storage_root or raw.get("storage") or "runs/sweeps"),
                  base=base, grid=grid, search=search, num_samples=num_samples, asha=asha,
                  max_concurrent_trials=max_concurrent)
    # Combinations may be invalid even where every value is valid alone.
    return dataclasses.replace(sweep, configs=tuple(grid_configs(sweep)))


def _parse_grid(base: dict, grid: dict) -> dict:
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid.{key}: expected a non-empty list of values, got {values!r}")
        if len({json.dumps(v) for v in values}) < len(values):  # trials of equal values would share a run dir
            raise SweepError(f"grid.{key}: values repeat in {values!r}; list each once (num_samples repeats trials)")
        for value in values:
            _check_key(base, key, value, "grid")
    return grid


def _parse_scheduler(raw: Any) -> dict | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"asha"} or not isinstance(raw["asha"] or {}, dict):
        raise SweepError(f"scheduler: expected null or {{asha: {{{', '.join(ASHA_KEYS)}}}}}, got {raw!r}")
    asha = {"grace_period": 1, "reduction_factor": 2, **(raw["asha"] or {})}
    unknown = sorted(set(asha) - set(ASHA_KEYS))
    if unknown:
        raise SweepError(f"unknown key 'scheduler.asha.{unknown[0]}'; valid keys: "
                         + ", ".join(f"scheduler.asha.{k}" for k in ASHA_KEYS))
    if not isinstance(asha["grace_period"], int) or asha["grace_period"] < 1:
        raise SweepError(f"scheduler.asha.grace_period: expected epochs >= 1, got {asha['grace_period']!r}")
    if not isinstance(asha["reduction_factor"], (int, float)) or asha["reduction_factor"] <= 1:
        raise SweepError(f"scheduler.asha.reduction_factor: expected a number > 1, got {asha['reduction_factor']!r}")
    return asha


def tune_metric(sweep: Sweep) -> str:
    """What Tune (and ASHA) compares trials on: validation accuracy when every trial holds out a val split, else test
    accuracy (the only score all trials report)."""
    from ray_resnet.core.loop import selection_metric

    return "val_acc" if all(selection_metric(c) == "val_acc" for c in sweep.configs) else "test_acc"


def grid_configs(sweep: Sweep) -> list[Config]:
    """One config per grid point, with every sampled key at its first bound/choice (load_sweep keeps them as
    Sweep.configs, for the checks before trials)."""
    lows = {k: next(iter(spec.values()))[0] for k, spec in sweep.search.items()}
    out = []
    for combo in itertools.product(*sweep.grid.values()):
        values = {**dict(zip(sweep.grid, combo)), **lows}
        try:
            out.append(trial_config(sweep, values))
        except ConfigError as e:
            raise SweepError(f"grid point {values}: {e}") from None
    return out


def trial_count(sweep: Sweep) -> int:
    return math.prod(len(v) for v in sweep.grid.values()) * sweep.num_samples


def trial_name(sweep: Sweep, values: dict, trial_id: str) -> str:
    """Readable and unique: <model>-s<seed>[-<key>=<value>...][-<trial index> where values are sampled].

    A grid value is written in full (repr: two grid values never share a dir), a sampled one to 3 digits (the
    trial index tells those apart)."""
    cfg = trial_config(sweep, values)
    parts = [cfg.model, f"s{cfg.seed}"]
    for key in sweep.swept:
        if key not in ("model", "seed"):
            value = values[key]
            parts.append(f"{key.split('.')[-1]}={_shown(value, sampled=key in sweep.search)}")
    if sweep.search or sweep.num_samples > 1:
        parts.append(trial_id.rsplit("_", 1)[-1])  # Tune's per-experiment trial counter, e.g. 00003
    return "-".join(str(p).replace("/", "_").replace(" ", "") for p in parts)


def _shown(value: Any, sampled: bool) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if sampled else repr(value)
    return str(value)


def _flat_values(sweep: Sweep, trial_space: dict) -> dict:
    flat = flatten(trial_space)
    return {key: flat[key] for key in sweep.swept}


class TrialDirname:
    """Tune's trial_dirname_creator: the trial's Tune dir is also its Train run dir (picklable for --resume)."""

    def __init__(self, sweep: Sweep):
        self.sweep = sweep

    def __call__(self, trial) -> str:
        return trial_name(self.sweep, _flat_values(self.sweep, trial.config), trial.trial_id)


def dataset_key(cfg: Config) -> tuple[str, str]:
    """What tells a sweep's datasets apart: trials with the same key share one copy in the object store."""
    return cfg.data.root, cfg.data.dataset


def run_trial(trial_space: dict, sweep: Sweep, datasets: dict, command: list[str] | None = None) -> None:
    """One Tune trial: a full `ray-resnet train` run whose per-epoch reports also go to Tune. `datasets`: the
    sweep's datasets in the object store, by dataset_key; `command`: the sweep's command line, for the trial's
    environment.json."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_resnet.raytrain.driver import run_training

    values = _flat_values(sweep, trial_space)
    name = trial_name(sweep, values, ray.tune.get_context().get_trial_id())
    cfg = config_lib.replace(trial_config(sweep, values), run={"name": name, "storage": sweep.dir})
    hparams = {k: v if isinstance(v, (str, bool, int, float)) else str(v) for k, v in values.items()}
    try:
        run_training(cfg, callbacks=[TuneReportCallback()], hparams=hparams, dataset=datasets[dataset_key(cfg)],
                     command=command)
    except DivergedError:  # recorded in its result.json; a trial Tune counts as errored would rerun on --resume
        pass
    except DirInUseError:  # another driver writes that run dir: record nothing there; --resume reruns the trial
        raise
    except WorkersNotStartedError:  # no room for its workers yet, maybe later: failed, and --resume reruns it
        raise
    except UserError as e:  # deterministic (bad data for this trial's split, a worker's error): recorded, not rerun
        _record_trial_error(resolve_run(cfg), str(e))


def _record_trial_error(cfg: Config, message: str) -> None:
    """result.json status "error" in the trial's run dir (with its config.yaml, so report and status list it)."""
    directory = run_dir(cfg)
    if not storage.is_file(storage.join(directory, CONFIG_FILE)):
        write_config(cfg)
    print(f"trial {cfg.run.name} failed: {message}", flush=True)
    trained = committed_epoch(storage.read_json(storage.join(directory, SNAPSHOT_FILE))).epoch
    write_result(directory, RunResult(name=cfg.run.name, model=cfg.model, dataset=cfg.data.dataset, seed=cfg.seed,
                                      epoch=trained, epochs=cfg.schedule.epochs, status="error", error=message,
                                      run_dir=directory))


def _param_space(sweep: Sweep) -> dict:
    from ray import tune

    space = {key: tune.grid_search(values) for key, values in sweep.grid.items()}
    for key, spec in sweep.search.items():
        kind, args = next(iter(spec.items()))
        space[key] = tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
    return nest(space)


def _max_concurrent(sweep: Sweep) -> int:
    """Trials that fit at once: each trial's worker group has its own placement group outside the trial's own
    (tiny) resources, so Tune must not start more trials than the cluster has room for their workers."""
    from ray_resnet.raytrain.cluster import plan_resources, worker_slots

    configs = sweep.configs
    if any(cfg.run.autoscaling for cfg in configs):  # the nodes do not exist yet: nothing to count
        if not sweep.max_concurrent_trials:  # (Tune would read 0 as "no limit")
            raise SweepError("with run.autoscaling the cluster cannot say yet how many trials fit: set "
                             "resources.max_concurrent_trials in the sweep file")
        return sweep.max_concurrent_trials
    fits = []
    for cfg in configs:
        try:
            bundle = plan_resources(cfg).bundle
        except RunError as e:
            raise SweepError(f"one trial cannot fit on this cluster: {e}; lower resources.workers_per_trial / "
                             "cpus_per_worker / gpus_per_worker in the sweep file, or add nodes") from None
        fits.append(worker_slots(bundle) // cfg.run.worker_range[1])
    return min([*fits, sweep.max_concurrent_trials or math.inf])


def check_resume(sweep: Sweep, resume: bool) -> None:
    saved = storage.join(sweep.dir, SWEEP_FILE)
    if not resume:
        if set(storage.list_names(sweep.dir)) - {lease.LEASE_DIR}:
            raise SweepError(f"sweep dir {sweep.dir} already exists: continue it with --resume, or pass a new "
                             "--name (nothing was changed)")
        return
    if not storage.is_file(saved):
        raise SweepError(f"nothing to resume: {saved} not found; start the sweep without --resume")
    old = yaml.safe_load(storage.read_text(saved))
    new = _yaml_round_trip(sweep.as_dict())
    # What the trials compute must stay; where and how they run (data.root, resources, ...) may change.
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
               if k not in ("config", "storage", "resources") and old.get(k) != new.get(k)]
    changed += config_lib.recipe_changes(old.get("config") or {}, new["config"])
    if changed:
        raise SweepError(f"the sweep in {sweep.dir} was started with another recipe ({'; '.join(changed[:4])}): "
                         "resume with the same sweep file and --set values, or pass a new --name")


def _yaml_round_trip(d: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump(d, sort_keys=False))


@dataclass(frozen=True)
class SweepOutcome:
    dir: str
    trials: int
    finished: int
    diverged: int  # trials whose loss became NaN/inf
    errors: list[str]  # one line per failed trial
    max_concurrent_trials: int


def run_sweep(sweep: Sweep, resume: bool = False, address: str | None = None) -> SweepOutcome:
    """Run (or continue) the sweep; returns how its trials ended."""
    storage.check_writable(sweep.storage)  # a bad bucket, endpoint or credentials: one line, before anything runs
    # One driver per sweep dir (each trial also holds its own run dir's): taken before anything there is read.
    with lease.held(sweep.dir, "sweep dir", "wait for it to end, or pass another --name"):
        return _run_sweep_held(sweep, resume, address)


def _run_sweep_held(sweep: Sweep, resume: bool, address: str | None) -> SweepOutcome:
    from ray_resnet.raytrain.cluster import connect, ray_settings

    check_resume(sweep, resume)
    arrays = _load_datasets(sweep)
    tracked = _open_tracking(sweep)  # before Ray: a tracking server that is down is one line
    with ray_settings():
        connect(address)
        # One copy per dataset in the object store, which every trial's workers read (one copy per node they run
        # on); the driver keeps none of its own.
        datasets = {key: ray.put(arrays.pop(key)) for key in list(arrays)}
        max_concurrent = _max_concurrent(sweep)
        _check_stopped_trials_can_be_freed(sweep)
        results = _tuner(sweep, datasets, resume, max_concurrent).fit()
    errors = [_trial_error_line(r.error) for r in results if r.error]
    summaries = [r for r in (read_result(d) for d in trial_dirs(sweep.dir)) if r]
    errors += [f"{r.name}: {r.error}" for r in summaries if r.status == "error"]
    outcome = SweepOutcome(dir=sweep.dir, trials=trial_count(sweep), finished=sum(1 for r in summaries if r.finished),
                           diverged=sum(1 for r in summaries if r.status == "diverged"), errors=errors,
                           max_concurrent_trials=max_concurrent)
    if tracked:  # every trial ended one way or another: FINISHED; some still to run (--resume): KILLED
        ended = outcome.finished + outcome.diverged + len(errors) == outcome.trials
        tracking.end_run(tracked, "FINISHED" if ended else "KILLED", {SWEEP_FILE: storage.join(sweep.dir, SWEEP_FILE)})
    return outcome


def _trial_error_line(error: Exception) -> str:
    """A failed trial's own error in one line: Tune hands back Ray's task error, whose first line names the actor
    and whose `cause` is the trial's exception."""
    cause = getattr(error, "cause", None)
    lines = [line for line in str(cause if isinstance(cause, Exception) else error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


def _open_tracking(sweep: Sweep) -> tracking.TrackedRun | None:
    """The sweep's parent MLflow run; each trial's run (in the sweep dir) becomes its child."""
    params = {**flatten(sweep.base), **{f"grid.{k}": v for k, v in sweep.grid.items()},
              **{f"search.{k}": v for k, v in sweep.search.items()}}
    return tracking.open_run(sweep.configs[0], sweep.dir, sweep.name, params, tags={"sweep": sweep.name})


def _check_stopped_trials_can_be_freed(sweep: Sweep) -> None:
    """Ray Train frees the workers of a trial ASHA stops only once it has seen, through the dashboard's State API,
    that the trial's controller died; where that API cannot be reached (no dashboard, or several Ray instances on
    the machine and no RAY_ADDRESS to tell them apart) their CPUs stay held and later trials wait forever."""
    from ray.util.state import list_actors
    from ray.util.state.exception import RayStateApiException

    if not sweep.asha:
        return
    try:
        list_actors(limit=1, timeout=30, raise_on_missing_output=False)
    except (RayStateApiException, ConnectionError) as e:
        reason = str(e).splitlines()[0][:160]
        raise SweepError("scheduler.asha needs Ray's State API (Ray Train frees a stopped trial's workers through it, "
                         f"and without it later trials wait forever), which fails here ({reason}): "
                         "start Ray with its dashboard (`ray start --head --include-dashboard=true`), set RAY_ADDRESS "
                         "where several Ray instances run, or remove scheduler: from the sweep file") from None


def _load_datasets(sweep: Sweep) -> dict:
    """Each dataset the trials read, once; bad data paths fail here, before any Ray process starts."""
    from ray_resnet.raytrain.driver import check_split_fits, load_dataset

    arrays = {}
    for cfg in sweep.configs:
        key = dataset_key(cfg)
        if key not in arrays:
            arrays[key] = load_dataset(cfg)
        check_split_fits(cfg, len(arrays[key]["train_labels"]))  # here, not in every trial
    return arrays


def _tuner(sweep: Sweep, datasets: dict, resume: bool, max_concurrent: int) -> tune.Tuner:
    from ray.tune.logger import CSVLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    # The trial function only waits on its TorchTrainer: a 1-byte memory bundle instead of Tune's default 1 CPU,
    # which on a small cluster would hold the CPUs the trial's own workers need (a deadlock).
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep, datasets=datasets, command=sys.argv),
                                    {"memory": 1})
    if resume:
        sweep_path, filesystem = storage.for_ray(sweep.dir)  # an S3 bucket: with our retries
        return tune.Tuner.restore(sweep_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=filesystem)
    storage.write_text(storage.join(sweep.dir, SWEEP_FILE), yaml.safe_dump(sweep.as_dict(), sort_keys=False))
    scheduler = None
    if sweep.asha:
        # time_attr "epoch": Tune's training_iteration restarts at 1 when a trial is resumed. max_t one past the
        # last epoch: ASHA stops every trial that reaches max_t, before it could write its result.json.
        epochs = max(c.schedule.epochs for c in sweep.configs)
        scheduler = ASHAScheduler(time_attr="epoch", max_t=epochs + 1, **sweep.asha)
    storage_path, storage_filesystem = storage.for_ray(sweep.storage)
    return tune.Tuner(
        trainable, param_space=_param_space(sweep),
        tune_config=tune.TuneConfig(metric=tune_metric(sweep), mode=MODE, num_samples=sweep.num_samples,
                                    max_concurrent_trials=max_concurrent, scheduler=scheduler,
                                    trial_dirname_creator=TrialDirname(sweep)),
        run_config=tune.RunConfig(name=sweep.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                                  callbacks=[CSVLoggerCallback()],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
