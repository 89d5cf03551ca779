"""`ray-resnet` command line: train, sweep, report, status, eval, export, tensorboard.

Errors users can fix print one line and exit with status 2. Only `train` and `sweep` import Ray."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ray_resnet.constants import DATASETS
from ray_resnet.errors import UserError

# --smoke-test: a tiny real run for CI and first contact (seconds, not minutes).
SMOKE_OVERRIDES = {
    "data": {"train_subset": 512, "test_subset": 256},
    "schedule": {"epochs": 1, "warmup_epochs": 1, "milestones": []},
    "optim": {"batch_size": 64},
}
# Shortcut flags -> the config keys they set (argparse dest -> dotted key).
TRAIN_SHORTCUTS = {"model": "model", "num_workers": "run.num_workers", "data": "data.root",
                   "download": "data.download", "name": "run.name", "storage": "run.storage"}
SWEEP_SHORTCUTS = {"data": "data.root"}  # the sweep's own --name and --storage name the sweep dir


def _worker_count(text: str) -> int | list[int] | str:
    """--num-workers: N, or MIN-MAX (run.num_workers [min, max]); anything else goes to the config as typed, which
    names the key and what it takes."""
    low, dash, high = text.partition("-")
    try:
        return [int(low), int(high)] if dash else int(text)
    except ValueError:
        return text


def _overrides(args: argparse.Namespace, shortcuts: dict[str, str]) -> dict:
    """The config overrides of --smoke-test and of the shortcut flags given (not those of --set)."""
    from ray_resnet.config import merge, nest

    given = {key: getattr(args, dest) for dest, key in shortcuts.items()
             if getattr(args, dest) is not None and getattr(args, dest) is not False}  # 0 is a value (a bad one)
    return merge(SMOKE_OVERRIDES if args.smoke_test else {}, nest(given))


def _train(args: argparse.Namespace) -> int:
    from ray_resnet.config import load_config, replace
    from ray_resnet.io.rundir import default_run_name
    from ray_resnet.raytrain.driver import run_training

    cfg = load_config(args.config, args.set, _overrides(args, TRAIN_SHORTCUTS))
    if args.smoke_test:  # never resume or overwrite the real run of the same config
        cfg = replace(cfg, run={"name": f"{cfg.run.name or default_run_name(cfg)}-smoke"})
    result = run_training(cfg, address=args.address)
    if result.already_finished:
        print(f"run {result.name} is already finished ({result.epoch}/{result.epochs} epochs): "
              f"final test acc {result.final_test_acc:.2f}%, best {result.best_test_acc:.2f}%. "
              f"Pass --name NEW for a fresh run, or raise schedule.epochs to train on.")
    else:
        print(f"done: {result.name} ({result.model}, {result.params:,} params) "
              f"{result.epoch}/{result.epochs} epochs in {wall_time_text(result)}: "
              f"final test acc {result.final_test_acc:.2f}%, "
              f"best/ (epoch {result.best_epoch}) test acc {result.best_test_acc:.2f}%, {_selected(result)}")
    print(f"run dir: {result.run_dir}\nTensorBoard: tensorboard --logdir {result.run_dir}/tb")
    return 0


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss, or m:ss under an hour."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def wall_time_text(result) -> str:
    """A run's (a RunResult's) time over all its attempts, and this attempt's when it was resumed ("2:40:21 over 2
    attempts, this one 2:48")."""
    if result.attempts < 2:
        return clock(result.wall_time_s)
    return f"{clock(result.wall_time_s)} over {result.attempts} attempts, this one {clock(result.last_attempt_s)}"


def _selected(result) -> str:
    """How best/ was chosen, in words (result.json's best_selected_on; runs from before it had no val split)."""
    if result.best_val_acc is not None:
        return f"selected on the {result.best_selected_on}: val acc {result.best_val_acc:.2f}%"
    return "selected on the test set (an optimistic estimate; data.val_split=5000 holds out a validation set)"


def _sweep(args: argparse.Namespace) -> int:
    from ray_resnet.raytrain.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.config, args.set, _overrides(args, SWEEP_SHORTCUTS), name=args.name, storage=args.storage)
    if args.smoke_test:  # never resume or overwrite the real sweep of the same file
        sweep = dataclasses.replace(sweep, name=f"{sweep.name}-smoke")
    outcome = run_sweep(sweep, resume=args.resume, address=args.address)
    print(f"sweep {sweep.name}: {outcome.finished}/{outcome.trials} trials finished, "
          f"{outcome.diverged} diverged (loss NaN/inf), {len(outcome.errors)} failed "
          f"(at most {outcome.max_concurrent_trials} at once)")
    for error in outcome.errors:
        print(f"  failed: {error}")
    unfinished = outcome.trials - outcome.finished - outcome.diverged - len(outcome.errors)
    if unfinished:
        print(f"{unfinished} trial(s) did not finish: stopped early by ASHA, or interrupted (those continue with the "
              "same command + --resume)")
    print(f"sweep dir: {outcome.dir}\nTensorBoard: tensorboard --logdir {outcome.dir}\n"
          f"table and curves: ray-resnet report {outcome.dir}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from ray_resnet.apps.report import write_report

    report = write_report(args.sweep_dir)
    print(report.text)
    print(f"wrote {report.markdown}, {report.csv}, {report.curves}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from ray_resnet.core.steps import LabeledImages, StepSettings, evaluate

    model, info = _load_model(args)
    images, labels = _test_split(info, args.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device, memory_format=torch.channels_last)
    pixel_mean = None if info.pixel_mean is None else info.pixel_mean.to(device)
    metrics = evaluate(model, LabeledImages(images, labels), batch_size=info.eval_batch_size,
                       settings=StepSettings(pixel_mean=pixel_mean))
    source = {"checkpoint": str(args.checkpoint)} if args.checkpoint else {"weights": str(args.weights)}
    out = {**source, "format": info.format, "model": info.model, "dataset": info.dataset, "epoch": info.epoch,
           "kind": info.kind, "file": info.file, **metrics}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{info.model} from {_which(info)}, {info.file}, on {metrics['count']:,} {info.dataset} test "
              f"images: top-1 {metrics['acc']:.2f}%, loss {metrics['loss']:.4f}, {metrics['images_per_s']:,.0f} img/s")
    return 0


def _test_split(info, root: str | None):
    """The test split to evaluate a model on: under --data, else where the run that trained it read its data."""
    from ray_resnet.core.datasets import load_cifar
    from ray_resnet.errors import DataNotFoundError

    if not (root or info.data_root):
        raise DataNotFoundError(f"{info.file} does not say where its data is: pass --data DIR "
                                f"(a dir with the {info.dataset} parquet files or torchvision's pickles)")
    return load_cifar(root or info.data_root, "test", info.dataset, False, info.data_cache_dir)


def _load_model(args: argparse.Namespace):
    """(model, WeightsFile) of --checkpoint (its best, or with --final its latest checkpoint) or --weights."""
    from ray_resnet.core.weights import load_model
    from ray_resnet.errors import CheckpointError
    from ray_resnet.io.rundir import latest_checkpoint

    checkpoint = args.checkpoint
    if args.final:
        checkpoint = latest_checkpoint(args.checkpoint) if args.checkpoint else None
        if checkpoint is None:
            raise CheckpointError(f"--final needs --checkpoint RUN_DIR of a run with a committed checkpoint; "
                                  f"{args.checkpoint or '--weights'} has none")
    return load_model(checkpoint, args.weights, args.model, args.dataset)


def _which(info) -> str:
    """Which model of a run a weights file (a WeightsFile) holds, in words."""
    if info.kind == "best" and info.val_split:
        return (f"the best checkpoint (epoch {info.epoch}: the highest validation accuracy during training, on "
                f"{info.val_split} held-out training images; --final evaluates the last epoch)")
    if info.kind == "best":
        return (f"the best checkpoint (epoch {info.epoch}: the highest test accuracy during training, i.e. selected "
                "on the test set, an optimistic estimate; --final evaluates the last epoch)")
    if info.kind == "epoch":
        return f"the {'final ' if info.epoch == info.epochs else ''}checkpoint of epoch {info.epoch}"
    return f"a {info.format}"


def _export(args: argparse.Namespace) -> int:
    import torch

    from ray_resnet.apps.export import FORMATS, export_and_check
    from ray_resnet.constants import NUM_CLASSES
    from ray_resnet.core.augment import normalize
    from ray_resnet.errors import DataNotFoundError

    model, info = _load_model(args)
    try:  # the logit check runs on real test images where the data is at hand, else on fixed random inputs
        images = normalize(_test_split(info, args.data)[0][:256])
        batch = f"the first {len(images)} {info.dataset} test images"
    except DataNotFoundError:
        images = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        batch = "256 random inputs (no dataset found; pass --data to check on test images)"
    output = args.output or f"{info.model}-{info.dataset}{FORMATS[args.format]}"
    result = export_and_check(model, args.format, output, images, info.model, NUM_CLASSES[info.dataset])
    print(f"wrote {result.file} ({args.format}, {result.bytes:,} bytes); reloaded on {batch}: "
          f"max |logit diff| {result.max_abs_logit_diff:.2e}, same top-1 on {result.same_top1}/{len(images)}")
    if not result.same_logits:
        print(f"ray-resnet: error: the exported {args.format} file gives other logits than the model; "
              "do not use it (the file is kept for inspection)", file=sys.stderr)
        return 1
    return 0


def _tensorboard(args: argparse.Namespace) -> int:
    from ray_resnet.apps.tensorboard import serve

    serve(args.dir, args.host, args.port, args.refresh_s)
    return 0


def _status(args: argparse.Namespace) -> int:
    from ray_resnet.apps.status import read_status, status_json, status_table

    rows = read_status(args.root)
    print(status_json(rows) if args.json else status_table(rows))
    return 0


def _run_parent() -> argparse.ArgumentParser:
    """The flags `train` and `sweep` share."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--data", help="dataset dir: HuggingFace parquet files or cifar-10-batches-py (data.root)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local embedded Ray)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=0.05 (repeatable)")
    p.add_argument("--smoke-test", action="store_true", help="tiny subset, one short epoch (every trial of a sweep)")
    return p


def _model_source_parent() -> argparse.ArgumentParser:
    """The flags `eval` and `export` share: which weights, which model, which data."""
    p = argparse.ArgumentParser(add_help=False)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint.pt, a checkpoint dir, or a run dir (its best checkpoint); "
                                             "local or a URI")
    source.add_argument("--weights", help="a state dict, a ray-resnet checkpoint.pt, or a {'state_dict': ...} file "
                                          "(e.g. from akamaster/pytorch_resnet_cifar10; `module.` prefixes are fine)")
    p.add_argument("--model", help="model name, e.g. resnet20 (default: what the checkpoint says)")
    p.add_argument("--dataset", choices=DATASETS,
                   help="the class count to build (default: what the checkpoint says, else cifar10)")
    p.add_argument("--data", help="dataset dir (default: the data.root the run was trained on)")
    p.add_argument("--final", action="store_true",
                   help="with --checkpoint RUN_DIR: its final (latest) checkpoint instead of the best one")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-resnet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_flags, model_source = _run_parent(), _model_source_parent()

    p = sub.add_parser("train", parents=[run_flags], help="train (or resume) one run with Ray Train")
    p.add_argument("-c", "--config", type=Path, help="YAML overrides of the reference recipe (configs/*.yaml)")
    p.add_argument("--model", help="model name, e.g. resnet32 (overrides the config's model)")
    p.add_argument("--num-workers", type=_worker_count, help="Ray Train workers, N or MIN-MAX for an elastic run "
                                                             "(e.g. 1-4); the global batch stays optim.batch_size")
    p.add_argument("--download", action="store_true",
                   help="fetch CIFAR with torchvision's downloader if --data holds none (data.download)")
    p.add_argument("--name", help="run name; rerunning with the same name resumes (run.name)")
    p.add_argument("--storage", help="where run dirs go (run.storage, default runs/)")
    p.set_defaults(func=_train)

    p = sub.add_parser("sweep", parents=[run_flags],
                       help="run (or --resume) a Ray Tune sweep file: grid and/or search over config keys")
    p.add_argument("-c", "--config", type=Path, required=True, help="sweep file (configs/sweep_*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep: finished trials are kept")
    p.add_argument("--name", help="sweep name (default: the file's name:); the sweep dir is <storage>/<name>")
    p.add_argument("--storage", help="where sweep dirs go (default: the file's storage:, else runs/sweeps)")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("eval", parents=[model_source], help="test accuracy of a checkpoint or a weights file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_eval)

    p = sub.add_parser("export", parents=[model_source],
                       help="write a model as a state dict, TorchScript or ONNX, and check its logits")
    p.add_argument("--format", required=True, choices=["state_dict", "torchscript", "onnx"])
    p.add_argument("--output", help="file to write, local or a URI (default: <model>-<dataset>.{pt,ts.pt,onnx} here)")
    p.set_defaults(func=_export)
    _add_readers(sub)
    return parser


def _add_readers(sub: argparse._SubParsersAction) -> None:
    """The commands that only read run and sweep dirs."""
    p = sub.add_parser("report", help="report.md, report.csv and curves.png of a sweep dir (vs the paper's Table 6)")
    p.add_argument("sweep_dir", help="a sweep dir, e.g. runs/sweeps/table6 or s3://bucket/sweeps/table6")
    p.set_defaults(func=_report)

    p = sub.add_parser("status", help="one table of the runs and sweeps under a storage root: status, epoch, accuracy")
    p.add_argument("root", nargs="?", default="runs",
                   help="a storage root, sweep dir or run dir, local or a URI (default: runs)")
    p.add_argument("--json", action="store_true", help="print one JSON list of row objects")
    p.set_defaults(func=_status)

    p = sub.add_parser("tensorboard", help="serve TensorBoard on a run dir or a sweep dir")
    p.add_argument("dir", help="a run dir (runs/<name>) or a sweep dir, local or a URI (s3://, gs://, ...)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    p.add_argument("--port", type=int, default=6006)
    p.add_argument("--refresh-s", type=float, default=30.0,
                   help="a URI's event files are mirrored locally and refreshed every this many seconds")
    p.set_defaults(func=_tensorboard)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"ray-resnet: error: {e}", file=sys.stderr)
        return 2
