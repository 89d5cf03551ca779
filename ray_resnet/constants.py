"""Names and numbers several modules share: datasets, model names, normalisation, run-dir files, metric tags."""

import re

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
DATASETS = tuple(NUM_CLASSES)
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000}  # the full training sets (the test sets hold 10,000)

# The project's recipe normalises with the ImageNet statistics (timm's default), not CIFAR's own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# What a run dir holds besides Ray Train's checkpoint_* dirs (see train.py), and a sweep dir's own file.
CONFIG_FILE = "config.yaml"
RESULT_FILE = "result.json"
ENVIRONMENT_FILE = "environment.json"
BEST_DIR = "best"
TB_DIR = "tb"
TB_DIR_STEPS = "steps"  # inside tb/: the step-axis scalars, a TensorBoard run of their own
SWEEP_FILE = "sweep.yaml"
TRACKING_FILE = "mlflow.json"  # the MLflow run a run or sweep dir logs to, so a resumed run continues it

# Per-epoch metric (as reported to Ray and kept in checkpoints) -> its TensorBoard tag; `report` reads them back.
TB_TAGS = {
    "train_loss": "train/loss",
    "train_acc": "train/acc",
    "test_loss": "test/loss",
    "test_acc": "test/acc",
    "val_loss": "val/loss",  # with data.val_split only
    "val_acc": "val/acc",
    "lr": "lr",
    "train_images_per_s": "perf/train_images_per_s",
    "epoch_time_s": "perf/epoch_time_s",
}

# Every run.log_every_steps optimizer steps, with the run's step count (1-based, over epochs) as step: the training
# loss averaged over those steps (rank 0's share of each global batch, label smoothing included, as train/loss) and
# the lr of the latest step.
STEP_TAGS = {
    "train_loss": "step/train_loss",
    "lr": "step/lr",
}


# name pattern -> shortcut option; the registry lists the depths of the paper's experiments.
_FAMILIES = {"resnet": "A", "plain": None}
_NAME = re.compile(r"^(resnet|plain)(\d+)(b?)$")
MODEL_NAMES = (
    [f"resnet{d}" for d in (20, 32, 44, 56, 110, 1202)]
    + [f"resnet{d}b" for d in (20, 32, 44, 56, 110)]
    + [f"plain{d}" for d in (20, 32, 44, 56, 110)]
)


def parse_model_name(name: str) -> tuple[int, str | None]:
    """`resnet56` -> (56, "A"), `resnet56b` -> (56, "B"), `plain56` -> (56, None)."""
    match = _NAME.match(name)
    if not match or (match.group(1) == "plain" and match.group(3)):
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    family, depth, option_b = match.group(1), int(match.group(2)), match.group(3)
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, 1202, ...); got {depth} in {name!r}; "
                         f"registered models: {', '.join(MODEL_NAMES)}")
    return depth, "B" if option_b else _FAMILIES[family]
