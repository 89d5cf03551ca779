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
    for path in CONFIGS.glob("*.yaml"):
        if not path.name.startswith("sweep_"):
            load_config(path)


def test_set_overrides_parse_yaml_values():
    cfg = load_config(CONFIGS / "quickstart.yaml",
                      ["optim.lr=0.05", "schedule.milestones=[1, 2]", "optim.weight_decay=5e-4", "run.name=null"])
    assert cfg.optim.lr == 0.05 and cfg.schedule.milestones == (1, 2)
    assert cfg.optim.weight_decay == 5e-4 and cfg.run.name is None
    assert cfg.model == "resnet20"  # from the file
    assert parse_set("a.b.c=1") == {"a": {"b": {"c": 1}}}


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
