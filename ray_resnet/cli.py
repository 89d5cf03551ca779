"""`ray-resnet` command line: train, sweep, report, eval, export, tensorboard.

Errors users can fix print one line and exit with status 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError
from .dashboard import NoRunsError
from .data import DataNotFoundError
from .export import ExportError
from .weights import WeightsError

# --smoke-test: a tiny real run for CI and first contact (seconds, not minutes).
SMOKE_OVERRIDES = {
    "data": {"train_subset": 512, "test_subset": 256},
    "schedule": {"epochs": 1, "warmup_epochs": 1},
    "optim": {"batch_size": 64},
}


def _train(args: argparse.Namespace) -> int:
    from . import train
    from .config import load_config

    extra: dict = {}
    if args.smoke_test:
        extra = dict(SMOKE_OVERRIDES)
    if args.model:
        extra["model"] = args.model
    run = {k: v for k, v in (("num_workers", args.num_workers), ("name", args.name), ("storage", args.storage)) if v}
    if run:
        extra["run"] = run
    if args.data:
        extra["data"] = {**extra.get("data", {}), "root": args.data}
    if args.download:
        extra["data"] = {**extra.get("data", {}), "download": True}
    cfg = load_config(args.config, args.set, extra)
    if args.smoke_test:  # never resume or overwrite the real run of the same config
        cfg = train.config_lib.replace(cfg, run={"name": f"{cfg.run.name or train.default_run_name(cfg)}-smoke"})
    summary = train.run_training(cfg, address=args.address)
    if summary.get("already_finished"):
        print(f"run {summary['name']} is already finished ({summary['epoch']}/{summary['epochs']} epochs): "
              f"final test acc {summary['final_test_acc']:.2f}%, best {summary['best_test_acc']:.2f}%. "
              f"Pass --name NEW for a fresh run, or raise schedule.epochs to train on.")
    else:
        print(f"done: {summary['name']} ({summary['model']}, {summary['params']:,} params) "
              f"{summary['epoch']}/{summary['epochs']} epochs in {summary['wall_time_s']:.0f}s: "
              f"final test acc {summary['final_test_acc']:.2f}%, "
              f"best {summary['best_test_acc']:.2f}% (epoch {summary['best_epoch']})")
    print(f"run dir: {summary['run_dir']}\nTensorBoard: tensorboard --logdir {summary['run_dir']}/tb")
    return 0


def _model_from_args(args: argparse.Namespace):
    """(model, info) from --checkpoint (a file, checkpoint dir or run dir) or --weights, loaded strictly."""
    from .checkpoint import resolve_checkpoint
    from .weights import model_from_weights

    path = resolve_checkpoint(args.checkpoint) if args.checkpoint else args.weights
    return model_from_weights(path, args.model, args.dataset)


def _test_images(args: argparse.Namespace, info: dict):
    """The test split of the dataset: --data, else the data.root of the checkpoint's run."""
    from .data import load_cifar

    config = info.get("config", {})
    root = args.data or config.get("data", {}).get("root")
    if not root:
        raise DataNotFoundError(f"{info['file']} does not say where its data is: pass --data DIR "
                                f"(a dir with the {info['dataset']} parquet files or torchvision's pickles)")
    return load_cifar(root, "test", info["dataset"], False, config.get("data", {}).get("cache_dir")), config


def _sweep(args: argparse.Namespace) -> int:
    from . import tune

    extra = {"data": {"root": args.data}} if args.data else {}
    if args.smoke_test:
        extra = tune.config_lib._merge(SMOKE_OVERRIDES, extra)
    sweep = tune.load_sweep(args.config, args.set, extra, name=args.name, storage=args.storage)
    if args.smoke_test:  # never resume or overwrite the real sweep of the same file
        sweep = dataclasses.replace(sweep, name=f"{sweep.name}-smoke")
    outcome = tune.run_sweep(sweep, resume=args.resume, address=args.address)
    print(f"sweep {sweep.name}: {outcome['finished']}/{outcome['trials']} trials finished, "
          f"{len(outcome['errors'])} failed (at most {outcome['max_concurrent_trials']} at once)")
    for error in outcome["errors"]:
        print(f"  failed: {error}")
    unfinished = outcome["trials"] - outcome["finished"] - len(outcome["errors"])
    if unfinished:
        print(f"{unfinished} trial(s) did not finish: stopped early by ASHA, or interrupted (those continue with the "
              "same command + --resume)")
    print(f"sweep dir: {outcome['dir']}\nTensorBoard: tensorboard --logdir {outcome['dir']}\n"
          f"table and curves: ray-resnet report {outcome['dir']}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    paths = write_report(args.sweep_dir)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .engine import evaluate

    model, info = _model_from_args(args)
    (images, labels), config = _test_images(args, info)
    perf = config.get("perf", {})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device, memory_format=torch.channels_last)
    metrics = evaluate(model, images, labels, batch_size=perf.get("eval_batch_size", 500),
                       amp=perf.get("amp", "auto"))
    source = {"checkpoint": str(args.checkpoint)} if args.checkpoint else {"weights": str(args.weights)}
    out = {**source, "format": info["format"], "model": info["model"], "dataset": info["dataset"],
           "epoch": info.get("epoch"), **metrics}
    if args.json:
        print(json.dumps(out))
    else:
        epoch = f" (epoch {info['epoch']})" if info.get("epoch") else ""
        print(f"{info['model']}{epoch} from {info['format']} {info['file']} on {metrics['count']:,} "
              f"{info['dataset']} test images: top-1 {metrics['acc']:.2f}%, loss {metrics['loss']:.4f}, "
              f"{metrics['images_per_s']:,.0f} img/s")
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from .data import NUM_CLASSES, normalize
    from .export import FORMATS, export_and_check

    model, info = _model_from_args(args)
    try:  # the logit check runs on real test images where the data is at hand, else on fixed random inputs
        images = normalize(_test_images(args, info)[0][0][:256])
        batch = f"the first {len(images)} {info['dataset']} test images"
    except DataNotFoundError:
        images = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        batch = "256 random inputs (no dataset found; pass --data to check on test images)"
    output = args.output or Path(f"{info['model']}-{info['dataset']}{FORMATS[args.format]}")
    result = export_and_check(model, args.format, output, images, info["model"], NUM_CLASSES[info["dataset"]])
    print(f"wrote {result['file']} ({args.format}, {result['bytes']:,} bytes); reloaded on {batch}: "
          f"max |logit diff| {result['max_abs_logit_diff']:.2e}, same top-1 on {result['same_top1']}/{len(images)}")
    if not result["same_logits"]:
        print(f"ray-resnet: error: the exported {args.format} file gives other logits than the model; "
              "do not use it (the file is kept for inspection)", file=sys.stderr)
        return 1
    return 0


def _tensorboard(args: argparse.Namespace) -> int:
    from .dashboard import serve

    serve(args.dir, args.host, args.port)
    return 0


def _add_model_source(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint.pt, a checkpoint dir, or a run dir (its best checkpoint)")
    source.add_argument("--weights", help="a state dict, a ray-resnet checkpoint.pt, or a {'state_dict': ...} file "
                                          "(e.g. from akamaster/pytorch_resnet_cifar10; `module.` prefixes are fine)")
    p.add_argument("--model", help="model name, e.g. resnet20 (default: what the checkpoint says)")
    p.add_argument("--dataset", choices=["cifar10", "cifar100"],
                   help="the class count to build (default: what the checkpoint says, else cifar10)")
    p.add_argument("--data", help="dataset dir (default: the data.root the run was trained on)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-resnet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) one run with Ray Train")
    p.add_argument("-c", "--config", type=Path, help="YAML overrides of the reference recipe (configs/*.yaml)")
    p.add_argument("--model", help="model name, e.g. resnet32 (overrides the config's model)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers; the global batch stays optim.batch_size")
    p.add_argument("--data", help="dataset dir: HuggingFace parquet files or cifar-10-batches-py (data.root)")
    p.add_argument("--download", action="store_true",
                   help="fetch CIFAR with torchvision's downloader if --data holds none (data.download)")
    p.add_argument("--name", help="run name; rerunning with the same name resumes (run.name)")
    p.add_argument("--storage", help="where run dirs go (run.storage, default runs/)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local embedded Ray)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=0.05 (repeatable)")
    p.add_argument("--smoke-test", action="store_true", help="tiny subset, one short epoch")
    p.set_defaults(func=_train)

    p = sub.add_parser("sweep", help="run (or --resume) a Ray Tune sweep file: grid and/or search over config keys")
    p.add_argument("-c", "--config", type=Path, required=True, help="sweep file (configs/sweep_*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep: finished trials are kept")
    p.add_argument("--data", help="dataset dir for every trial (data.root)")
    p.add_argument("--name", help="sweep name (default: the file's name:); the sweep dir is <storage>/<name>")
    p.add_argument("--storage", help="where sweep dirs go (default: the file's storage:, else runs/sweeps)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local embedded Ray)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of every trial, e.g. --set schedule.epochs=50 (repeatable)")
    p.add_argument("--smoke-test", action="store_true", help="every trial on a tiny subset for one short epoch")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("report", help="report.md, report.csv and curves.png of a sweep dir (vs the paper's Table 6)")
    p.add_argument("sweep_dir", type=Path, help="a sweep dir, e.g. runs/sweeps/table6")
    p.set_defaults(func=_report)

    p = sub.add_parser("eval", help="test accuracy of a checkpoint or a weights file (strict loading)")
    _add_model_source(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_eval)

    p = sub.add_parser("export", help="write a model as a state dict, TorchScript or ONNX, and check its logits")
    _add_model_source(p)
    p.add_argument("--format", required=True, choices=["state_dict", "torchscript", "onnx"])
    p.add_argument("--output", type=Path, help="file to write (default: <model>-<dataset>.{pt,ts.pt,onnx} here)")
    p.set_defaults(func=_export)

    p = sub.add_parser("tensorboard", help="serve TensorBoard on a run dir or a sweep dir")
    p.add_argument("dir", help="a run dir (runs/<name>) or a sweep dir")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    p.add_argument("--port", type=int, default=6006)
    p.set_defaults(func=_tensorboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .report import ReportError
    from .train import RunError
    from .tune import SweepError

    try:
        return args.func(args)
    except (ConfigError, DataNotFoundError, CheckpointError, RunError, SweepError, ReportError, WeightsError,
            ExportError, NoRunsError) as e:
        print(f"ray-resnet: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
