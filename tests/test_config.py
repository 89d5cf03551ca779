import pytest

from ray_resnet.config import Config, ConfigError, from_dict, load_config, parse_set, save_config, to_dict

CONFIGS = __import__("pathlib").Path(__file__).parents[1] / "configs"


def test_defaults_are_the_reference_recipe():
    c = Config()
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay, c.optim.batch_size) == (0.1, 0.9, 1e-4, 128)
    assert (c.schedule.epochs, c.schedule.milestones, c.schedule.gamma) == (200, (100, 150), 0.1)
    assert (c.schedule.warmup_epochs, c.schedule.warmup_start_lr) == (10, 1e-5)
    assert (c.optim.label_smoothing, c.data.erase_p) == (0.1, 0.25)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().optim.lr = 1.0


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110, 1202])
def test_shipped_depth_configs_only_change_the_model(depth):
    cfg = load_config(CONFIGS / f"cifar10_resnet{depth}.yaml")
    assert cfg == from_dict({"model": f"resnet{depth}"})


def test_every_shipped_config_loads():
    for path in CONFIGS.glob("**/*.yaml"):
        if not path.name.startswith("sweep_"):
            load_config(path)


def test_the_timm_recipe_is_the_defaults():
    assert Config().recipe == "timm" and from_dict({"recipe": "timm"}) == Config()
    assert (Config().data.normalize, Config().data.val_split, Config().schedule.warmup) == ("imagenet", None, "linear")


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110, 1202])
def test_paper_configs_hold_the_papers_recipe_on_its_45k_5k_split(depth):
    cfg = load_config(CONFIGS / "paper" / f"cifar10_resnet{depth}.yaml")
    assert (cfg.recipe, cfg.model, cfg.data.val_split) == ("paper", f"resnet{depth}", 5000)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.batch_size) == (0.1, 0.9, 1e-4, 128)
    assert (cfg.optim.label_smoothing, cfg.data.erase_p, cfg.data.normalize) == (0, 0, "pixel_mean")
    steps = 352  # ceil(45000 / 128)
    # float64 divisions, as in config.py: approx's default rel 1e-6 absorbs any rounding of them (below too)
    assert cfg.schedule.milestones == pytest.approx((32_000 / steps, 48_000 / steps))
    assert cfg.schedule.epochs == 182  # ceil(64000 / 352): 64,064 iterations
    assert cfg.schedule.warmup == "constant" and cfg.schedule.warmup_start_lr == 0.01
    assert cfg.schedule.warmup_epochs == (pytest.approx(400 / steps) if depth >= 110 else 0)


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110, 1202])
def test_reproduction_configs_hold_its_recipe(depth):
    cfg = load_config(CONFIGS / "reproduction" / f"cifar10_resnet{depth}.yaml")
    assert (cfg.recipe, cfg.data.val_split, cfg.data.normalize) == ("reproduction", None, "imagenet")
    assert (cfg.optim.label_smoothing, cfg.data.erase_p) == (0, 0)
    assert (cfg.schedule.epochs, cfg.schedule.milestones) == (200, (100, 150))
    assert (cfg.schedule.warmup, cfg.schedule.warmup_start_lr) == ("constant", 0.01)
    assert cfg.schedule.warmup_epochs == (1 if depth >= 110 else 0)


def test_the_paper_recipe_counts_iterations_of_the_training_set_in_use():
    whole = from_dict({"recipe": "paper"})  # 50k images: 391 steps per epoch
    # float64 divisions, as in config.py: approx's default rel 1e-6 absorbs any rounding of them
    assert whole.schedule.milestones == pytest.approx((32_000 / 391, 48_000 / 391)) and whole.schedule.epochs == 164
    subset = from_dict({"recipe": "paper", "data": {"val_split": 5000, "train_subset": 12_800}, "model": "resnet110"})
    assert subset.schedule.milestones == (320, 480) and subset.schedule.epochs == 640  # 100 steps per epoch
    assert subset.schedule.warmup_epochs == 4


def test_keys_set_over_a_recipe_win_and_the_resolved_tree_reloads(tmp_path):
    cfg = load_config(CONFIGS / "paper" / "cifar10_resnet110.yaml", ["schedule.epochs=200", "data.erase_p=0.5"])
    assert (cfg.schedule.epochs, cfg.data.erase_p, cfg.data.normalize) == (200, 0.5, "pixel_mean")
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    # the preset follows the model wherever it is set, e.g. by a sweep's grid
    assert from_dict({"recipe": "paper", "model": "resnet20"}).schedule.warmup_epochs == 0


def test_set_overrides_parse_yaml_values():
    cfg = load_config(CONFIGS / "quickstart.yaml",
                      ["optim.lr=0.05", "schedule.milestones=[1, 2]", "optim.weight_decay=5e-4", "run.name=null"])
    assert cfg.optim.lr == 0.05 and cfg.schedule.milestones == (1, 2)
    assert cfg.optim.weight_decay == 5e-4 and cfg.run.name is None
    assert cfg.model == "resnet20"  # from the file
    assert parse_set("a.b.c=1") == {"a": {"b": {"c": 1}}}
    # YAML 1.1 reads on/off as booleans: the values of a key whose choices are "on" / "off" still mean them
    assert [load_config(None, [f"perf.compile={v}"]).perf.compile for v in ("on", "off", "auto")] == ["on", "off", "auto"]


@pytest.mark.parametrize("assignment, message", [
    ("optim.lrr=0.1", "unknown key 'optim.lrr'; valid keys: optim.lr, optim.momentum"),
    ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
    ("data.dataset=mnist", "data.dataset: expected 'cifar10' | 'cifar100'"),
    ("run.num_workers=1.5", "run.num_workers: expected int"),
    ("data.download=1", "data.download: expected bool"),
    ("model=resnet30", "depth must be 6n\\+2"),
    ("model=vgg", "model: unknown model 'vgg'; choose one of: resnet20"),
    ("optim=3", "optim: expected a mapping"),
    ("run.log_every_steps=0", "run.log_every_steps: 0 is out of range: it must satisfy log_every_steps >= 1"),
    ("run.log_every_steps=2.5", "run.log_every_steps: expected int, got 2.5"),
    ("nokey", "--set expects key=value"),
])
def test_bad_values_name_the_key(assignment, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [assignment])


def test_errors_in_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'optim.learning_rate'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(CONFIGS / "quickstart.yaml", ["optim.lr=0.2"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert from_dict(to_dict(cfg)) == cfg
