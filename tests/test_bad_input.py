"""Bad input, as a new user would type it: every case exits with 2 and exactly one line on stderr (no traceback),
before any work starts, and leaves every file already in the run dir byte-identical.

All cases fail before Ray starts, so they run in this process (no Ray: the `not ray` group)."""

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from ray_resnet.apps import cli
from ray_resnet.config import load_config, save_config, to_dict
from ray_resnet.core.checkpoint import CheckpointState, save_checkpoint

from fixtures import own_lines, random_cifar, trained_like, write_parquet_cifar, write_torchvision_cifar

# A recipe that is valid for the tiny datasets below: one short epoch.
QUICK = ["schedule.epochs=1", "schedule.warmup_epochs=0", "schedule.milestones=[]", "optim.batch_size=8"]


@dataclass
class World:
    root: Path  # a valid tiny CIFAR-10 parquet dir
    storage: Path
    run_dir: Path  # an interrupted run "kept" (its config, checkpoints, best/, tb/): must never change
    files: Path  # bad data dirs and files


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _parquet(path: Path, columns: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path / "train.parquet")
    pq.write_table(pa.table(columns), path / "test.parquet")
    return path


def _images(images: list[np.ndarray]) -> pa.Array:
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.array([{"bytes": _png(i), "path": None} for i in images], type=img_type)


@pytest.fixture(scope="module")
def world(tmp_path_factory, cache_dir) -> World:
    base = tmp_path_factory.mktemp("bad-input")
    root = base / "cifar"
    write_parquet_cifar(root, *random_cifar(40), "train")
    write_parquet_cifar(root, *random_cifar(20, seed=1), "test")
    storage, files = base / "runs", base / "files"
    run_dir = storage / "kept"
    cfg = load_config(None, [f"data.root={root}", *QUICK, "run.name=kept", f"run.storage={storage}"])
    save_config(cfg, run_dir / "config.yaml")
    state = CheckpointState(trained_like().state_dict(), to_dict(cfg), 1)
    save_checkpoint(state, run_dir / "checkpoint_2026-01-01_00-00-00.000000")
    save_checkpoint(state, run_dir / "best")
    with SummaryWriter(str(run_dir / "tb")) as writer:
        writer.add_scalar("train/loss", 2.0, 1)

    rng = np.random.default_rng(0)
    pixels = lambda size: rng.integers(0, 256, (size, size, 3), dtype=np.uint8)  # noqa: E731
    (files / "empty").mkdir(parents=True)
    _parquet(files / "no-rows", {"img": _images([]), "label": pa.array([], pa.int64())})
    _parquet(files / "schema", {"image": pa.array([b"x"]), "target": pa.array([1])})
    _parquet(files / "28x28", {"img": _images([pixels(28)] * 4), "label": pa.array([0, 1, 2, 3])})
    _parquet(files / "labels", {"img": _images([pixels(32)] * 4), "label": pa.array([0, 1, 2, 10])})
    (files / "garbage").mkdir()
    (files / "garbage" / "train.parquet").write_bytes(b"not parquet at all")
    (files / "garbage" / "test.parquet").write_bytes(b"not parquet at all")
    write_torchvision_cifar(files / "pickles", *random_cifar(10), *random_cifar(10, seed=1))
    batch = files / "pickles" / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:500])  # truncated as by an interrupted download

    (files / "list.yaml").write_text("- model: resnet20\n")
    (files / "broken.yaml").write_text("optim: {lr: 0.1\n")
    (files / "typo.yaml").write_text("optim:\n  learning_rate: 0.1\n")
    (files / "momentum.yaml").write_text("optim:\n  momentum: 2\n")
    sweeps = {"grid-lr": {"grid": {"optim.lr": [0.1, -1]}},
              "search-momentum": {"search": {"optim.momentum": {"uniform": [0.5, 1.5]}}},
              "grid-rule": {"config": {"schedule": {"warmup_epochs": 0}}, "grid": {"schedule.epochs": [50, 200]}},
              "top-key": {"gird": {"seed": [0]}},
              "workers": {"resources": {"workers_per_trial": 0}},
              "small-data": {"config": {"data": {"root": str(root)}}, "grid": {"seed": [0]},
                             "resources": {"workers_per_trial": 50, "cpus_per_worker": 1}}}
    for name, sweep in sweeps.items():
        (files / f"sweep-{name}.yaml").write_text(yaml.safe_dump(sweep))

    torch.save(state.to_dict(), files / "whole.pt")
    (files / "truncated").mkdir()
    (files / "truncated" / "checkpoint.pt").write_bytes((files / "whole.pt").read_bytes()[:2000])
    torch.save({"model": trained_like("resnet32").state_dict(), "config": to_dict(cfg), "epoch": 1},
               files / "resnet32.pt")
    torch.save({"weights": trained_like().state_dict(), "run": Path("/tmp")}, files / "pickled-code.pt")
    (files / "exists.pt").write_bytes(b"keep me")
    (files / "no-runs").mkdir()
    return World(root, storage, run_dir, files)


SHIPPED = Path(__file__).parents[1] / "configs"


def _train(w: World, *extra: str) -> list[str]:
    """`ray-resnet train` on the kept run (same name and storage), valid but for `extra`."""
    sets = [a for s in QUICK for a in ("--set", s)]
    return ["train", "--data", str(w.root), "--storage", str(w.storage), "--name", "kept", *sets, *extra]


def _set(*assignments: str):
    return lambda w: _train(w, *[a for s in assignments for a in ("--set", s)])


CASES = {
    # CLI flags and --set values: ranges
    # storage and data locations, checked before anything runs
    "storage file://host/x": (lambda w: _train(w, "--storage", "file://runs/x"), "file:// is followed by an absolute"),
    "storage ?query": (lambda w: _train(w, "--storage", "s3://bucket/runs?region=eu-west-1"), "\\?query or #fragment"),
    "storage is a file": (lambda w: _train(w, "--storage", str(w.files / "exists.pt")), "a file is in the way"),
    "storage read-only": (lambda w: _train(w, "--storage", "/proc/ray-resnet-runs"), "cannot write there"),
    "data is a file": (lambda w: _train(w, "--data", str(next(w.root.rglob("train*.parquet")))),
                       "is a file: give the folder that holds"),
    # names: one path segment under the storage
    "name ../x": (lambda w: _train(w, "--name", "../escaped"), "run.name='../escaped' is not one safe path segment"),
    "name /abs": (lambda w: _train(w, "--name", str(w.files / "abs")), "is not one safe path segment"),
    "name query": (_set("run.name=a?b"), "run.name='a\\?b' is not one safe path segment"),
    "num-workers 0": (lambda w: _train(w, "--num-workers", "0"), "run.num_workers: 0 is out of range"),
    "num-workers x": (lambda w: _train(w, "--num-workers", "x"), "run.num_workers: expected int | list of int, got 'x'"),
    "elastic max < min": (lambda w: _train(w, "--num-workers", "4-2"), "an elastic run takes \\[min, max\\]"),
    "elastic resize 0": (_set("run.num_workers=[1,2]", "run.resize_interval_s=0"), "resize_interval_s > 0"),
    "batchnorm typo": (_set("batchnorm=sync"), "batchnorm: expected 'global' | 'per_worker'"),
    "cuda graphs, 2 workers": (_set("perf.cuda_graphs=true", "run.num_workers=2"),
                               "perf.cuda_graphs=true with run.num_workers=2: .* set perf.cuda_graphs=false"),
    "checkpoint_every 0": (_set("run.checkpoint_every=0"), "run.checkpoint_every: 0 is out of range"),
    "checkpoint_every_min 0": (_set("run.checkpoint_every_min=0"),
                               "run.checkpoint_every_min: 0.0 is out of range: it must satisfy checkpoint_every_min > 0"),
    "keep_checkpoints 0": (_set("run.keep_checkpoints=0"), "keep_checkpoints >= 1"),
    "log_every_steps 0": (_set("run.log_every_steps=0"), "log_every_steps >= 1"),
    "gpus_per_worker 0": (_set("run.gpus_per_worker=0"), "gpus_per_worker > 0"),
    "cpus_per_worker 0": (_set("run.cpus_per_worker=0"), "cpus_per_worker >= 1"),
    "erase_p 2": (_set("data.erase_p=2"), "0 <= erase_p <= 1"),
    "warmup -1": (_set("schedule.warmup_epochs=-1"), "warmup_epochs >= 0"),
    "batch 0": (_set("optim.batch_size=0"), "batch_size >= 1"),
    "lr 0": (_set("optim.lr=0"), "lr > 0"),
    "lr inf": (_set("optim.lr=.inf"), "optim.lr: inf is out of range: it must satisfy lr > 0"),
    "momentum 1": (_set("optim.momentum=1"), "0 <= momentum < 1"),
    "weight_decay -1": (_set("optim.weight_decay=-1e-4"), "weight_decay >= 0"),
    "label_smoothing 1": (_set("optim.label_smoothing=1"), "0 <= label_smoothing < 1"),
    "gamma 0": (_set("schedule.gamma=0"), "0 < gamma <= 1"),
    "gamma 1.5": (_set("schedule.gamma=1.5"), "0 < gamma <= 1"),
    "epochs 0": (_set("schedule.epochs=0"), "epochs >= 1"),
    "milestone 0": (_set("schedule.milestones=[0]"), r"\[0\] holds 0, but each value must satisfy milestones >= 1"),
    "eval batch 0": (_set("perf.eval_batch_size=0"), "eval_batch_size >= 1"),
    "seed -1": (_set("seed=-1"), "seed >= 0"),
    "train_subset 0": (_set("data.train_subset=0"), "train_subset >= 1"),
    "max_failures -2": (_set("run.max_failures=-2"), "max_failures >= -1"),
    "start_timeout_s 0": (_set("run.start_timeout_s=0"),
                          "run.start_timeout_s: 0.0 is out of range: it must satisfy start_timeout_s >= 1"),
    "val_split 0": (_set("data.val_split=0"), "val_split >= 1"),
    "recipe typo": (_set("recipe=he2015"), "recipe: expected 'timm' | 'paper' | 'reproduction', got 'he2015'"),
    "normalize typo": (_set("data.normalize=cifar"), "data.normalize: expected 'imagenet' | 'pixel_mean'"),
    "warmup typo": (_set("schedule.warmup=cosine"), "schedule.warmup: expected 'linear' | 'constant'"),
    "val_split > dataset": (_set("data.val_split=50000"), "data.val_split=50000 holds out all 50,000 training images "
                                                         "in cifar10"),
    "val_split > dataset - workers": (_set("data.val_split=49999", "run.num_workers=2"),
                                      "data.val_split=49999 leaves fewer training images than run.num_workers=2 "
                                      "workers of the 50,000 in cifar10"),
    "val_split > data": (lambda w: _train(w, "--name", "val40", "--set", "data.val_split=40"),
                         "data.val_split=40 holds out all 40 training images under"),
    # rules between keys
    "warmup > epochs": (_set("schedule.warmup_epochs=3"), "warmup_epochs=3 is longer than schedule.epochs=1"),
    "milestones order": (_set("schedule.epochs=200", "schedule.milestones=[150, 100]"), "must increase strictly"),
    "milestones > epochs": (_set("schedule.milestones=[100]"), r"lie beyond schedule.epochs=1"),
    "batch < workers": (lambda w: _train(w, "--num-workers", "16"), "optim.batch_size=8 is the global batch"),
    "subset < workers": (lambda w: _train(w, "--num-workers", "2", "--set", "data.train_subset=1"),
                         "train_subset=1 gives some of the run.num_workers=2 workers no training image"),
    "data < workers": (lambda w: _train(w, "--name", "wide", "--num-workers", "50", "--set", "optim.batch_size=64"),
                       "40 training images cannot be split across run.num_workers=50"),
    # names, types, syntax
    "model": (lambda w: _train(w, "--model", "resnet30"), "depth must be 6n\\+2"),
    "unknown key": (_set("optim.lrr=0.1"), "unknown key 'optim.lrr'"),
    "type": (_set("optim.lr=fast"), "optim.lr: expected float, got 'fast'"),
    "no =": (_set("nokey"), "--set expects key=value"),
    # config files
    "config not a mapping": (lambda w: _train(w, "-c", str(w.files / "list.yaml")), "expected a mapping"),
    "config syntax": (lambda w: _train(w, "-c", str(w.files / "broken.yaml")), "is not valid YAML"),
    "config typo": (lambda w: _train(w, "-c", str(w.files / "typo.yaml")), "unknown key 'optim.learning_rate'"),
    "config range": (lambda w: _train(w, "-c", str(w.files / "momentum.yaml")), "0 <= momentum < 1"),
    "config missing": (lambda w: _train(w, "-c", str(w.files / "nope.yaml")), "not found"),
    # sweep files (every swept value checked like --set)
    "sweep grid value": (lambda w: ["sweep", "-c", str(w.files / "sweep-grid-lr.yaml")], "grid.optim.lr: optim.lr"),
    "sweep search bound": (lambda w: ["sweep", "-c", str(w.files / "sweep-search-momentum.yaml")],
                           "search.optim.momentum: optim.momentum: 1.5 is out of range"),
    "sweep grid rule": (lambda w: ["sweep", "-c", str(w.files / "sweep-grid-rule.yaml")],
                        "schedule.milestones=\\[100, 150\\] lie beyond schedule.epochs=50"),
    "sweep top key": (lambda w: ["sweep", "-c", str(w.files / "sweep-top-key.yaml")], "unknown key 'gird'"),
    "sweep name ..": (lambda w: ["sweep", "-c", str(SHIPPED / "sweep_lr_wd.yaml"), "--name", "..", "--storage",
                                 str(w.files / "sweeps")],
                      "name='..' is not one safe path segment"),
    "sweep workers 0": (lambda w: ["sweep", "-c", str(w.files / "sweep-workers.yaml")], "num_workers: 0 is out"),
    "sweep data < workers": (lambda w: ["sweep", "-c", str(w.files / "sweep-small-data.yaml"), "--storage",
                                        str(w.files / "sweeps")],
                             "40 training images cannot be split across run.num_workers=50 workers"),
    # data dirs
    "data missing": (lambda w: _train(w, "--data", str(w.files / "empty")), "split not found under"),
    "data no rows": (lambda w: _train(w, "--data", str(w.files / "no-rows")), "hold no images"),
    "data schema": (lambda w: _train(w, "--data", str(w.files / "schema")), "its columns are image, target"),
    "data 28x28": (lambda w: _train(w, "--data", str(w.files / "28x28")), "is 28x28; CIFAR images are 32x32"),
    "data labels": (lambda w: _train(w, "--data", str(w.files / "labels")), "labels under .* run from 0 to 10"),
    "data garbage": (lambda w: _train(w, "--data", str(w.files / "garbage")), "cannot read .*train.parquet as CIFAR"),
    "data truncated pickle": (lambda w: _train(w, "--data", str(w.files / "pickles")), "data_batch_1 as a CIFAR batch"),
    "data cifar100 on cifar10": (lambda w: _train(w, "--name", "c100", "--set", "data.dataset=cifar100"),
                                 "columns 'img' and 'fine_label'"),
    # checkpoints and weights
    "eval truncated": (lambda w: ["eval", "--checkpoint", str(w.files / "truncated")],
                       "cannot read .*truncated/checkpoint.pt as torch weights"),
    "eval other depth": (lambda w: ["eval", "--weights", str(w.files / "resnet32.pt"), "--model", "resnet20",
                                    "--data", str(w.root)], "depth 32, 10 classes .* the model has depth 20"),
    "eval pickled code": (lambda w: ["eval", "--weights", str(w.files / "pickled-code.pt"), "--model", "resnet20"],
                          "pickled Python objects besides tensors"),
    "eval missing": (lambda w: ["eval", "--weights", str(w.files / "nope.pt"), "--model", "resnet20"], "not found"),
    "eval no checkpoint": (lambda w: ["eval", "--checkpoint", str(w.files / "empty")], "no checkpoint at"),
    "eval --final": (lambda w: ["eval", "--checkpoint", str(w.run_dir), "--final"], "--final needs"),
    "export existing": (lambda w: ["export", "--checkpoint", str(w.run_dir), "--format", "state_dict",
                                   "--output", str(w.files / "exists.pt")], "already exists"),
    # storage
    "storage scheme": (lambda w: _train(w, "--storage", "foo://bucket/runs"), "pyarrow cannot open this kind of URI"),
    "storage secret in URI": (lambda w: _train(w, "--storage", "s3://AKID:secret@bucket/runs"), "credentials in a URI"),
    # run and sweep dirs
    "other recipe": (_set("optim.lr=0.2"), "holds a run with another config \\(optim.lr: 0.1 -> 0.2\\)"),
    "report not a sweep": (lambda w: ["report", str(w.run_dir)], "is not a sweep dir .it is one training run"),
    "tensorboard empty": (lambda w: ["tensorboard", str(w.files / "no-runs")], "no TensorBoard event files"),
}


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, case, capsys):
    argv, pattern = CASES[case]
    before, runs = _digest(world.run_dir), sorted(world.storage.iterdir())
    assert cli.main(argv(world)) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    assert err[0].startswith("ray-resnet: error: ")
    assert re.search(pattern, err[0]), err[0]
    assert _digest(world.run_dir) == before and sorted(world.storage.iterdir()) == runs  # no run dir made
    assert (world.files / "exists.pt").read_bytes() == b"keep me"


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40
