import pytest
import torch

from ray_resnet.config import OptimConfig, ScheduleConfig, load_config
from ray_resnet.core.batches import epoch_batches
from ray_resnet.core.loop import steps_per_epoch
from ray_resnet.core.models import build_model
from ray_resnet.core.steps import (
    LabeledImages,
    StepSettings,
    Training,
    evaluate,
    lr_at,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
)

RECIPE = ScheduleConfig()


@pytest.mark.parametrize("epoch, lr", [
    (0, 1e-5), (5, 1e-5 + (0.1 - 1e-5) / 2), (10, 0.1), (99.9, 0.1), (100, 0.01), (149, 0.01), (150, 0.001),
    (199.9, 0.001),
])
def test_lr_schedule_of_the_recipe(epoch, lr):
    assert lr_at(epoch, 0.1, RECIPE) == pytest.approx(lr)  # float64: approx's rel 1e-6 absorbs the rounding


@pytest.mark.filterwarnings(r"ignore:Detected call of .lr_scheduler.step\(\).")
def test_scheduler_steps_per_iteration():
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(model, OptimConfig())
    steps_per_epoch = 391  # ceil(50000 / 128)
    sched = make_scheduler(opt, 0.1, RECIPE, steps_per_epoch)
    seen = {}
    opt.step = lambda: None  # only the lr matters here; skip the parameter update
    for step in range(steps_per_epoch * 151 + 1):
        if step % steps_per_epoch == 0:
            seen[step // steps_per_epoch] = opt.param_groups[0]["lr"]
        elif step == steps_per_epoch // 2:
            seen[0.5] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    # LambdaLR sets base_lr * (lr_at(...) / base_lr) in float64, up to 1 ulp off: approx's rel 1e-6 absorbs it
    assert seen[0] == pytest.approx(1e-5)
    assert seen[0.5] == pytest.approx(lr_at((steps_per_epoch // 2) / steps_per_epoch, 0.1, RECIPE))
    assert seen[10] == pytest.approx(0.1) and seen[100] == pytest.approx(0.01) and seen[150] == pytest.approx(0.001)


CONFIGS = __import__("pathlib").Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("depth, warmup_lr", [(20, 0.1), (110, 0.01)])
def test_paper_configs_give_the_papers_lr_at_its_iterations(depth, warmup_lr):
    cfg = load_config(CONFIGS / "paper" / f"cifar10_resnet{depth}.yaml")
    steps = steps_per_epoch(cfg, 45_000, world=1)  # the training images left by the 5k val split
    assert steps == 352
    lr = make_scheduler(make_optimizer(torch.nn.Linear(2, 2), cfg.optim), cfg.optim.lr, cfg.schedule, steps).lr_lambdas[0]
    at = {it: lr(it) * cfg.optim.lr for it in (0, 399, 400, 31_999, 32_000, 47_999, 48_000)}
    # float64: lr_at / base_lr * base_lr and 0.1 * 0.1 ** k are 1 ulp off the decimals; approx's rel 1e-6 absorbs it
    assert at == pytest.approx({0: warmup_lr, 399: warmup_lr, 400: 0.1, 31_999: 0.1, 32_000: 0.01, 47_999: 0.01,
                                48_000: 0.001})
    assert cfg.schedule.epochs * steps >= 64_000 > (cfg.schedule.epochs - 1) * steps  # stops at 64k, in whole epochs


def test_a_constant_warmup_holds_its_lr_until_it_ends():
    schedule = ScheduleConfig(warmup="constant", warmup_epochs=1, warmup_start_lr=0.01)
    # float64: 0.1 * 0.1 ** 1 is 0.010000000000000002; approx's rel 1e-6 absorbs that
    assert [lr_at(e, 0.1, schedule) for e in (0, 0.5, 0.999, 1, 99.9, 100)] == pytest.approx(
        [0.01, 0.01, 0.01, 0.1, 0.1, 0.01])


def _tiny_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    # class-dependent colour + noise: learnable in a few steps
    base = torch.tensor([[40, 40, 200], [200, 40, 40], [40, 200, 40], [200, 200, 40]], dtype=torch.float)
    images = base[labels][:, :, None, None] + 30 * torch.randn(n, 3, 32, 32, generator=g)
    return images.clamp(0, 255).to(torch.uint8), labels


def test_train_one_epoch_learns_and_reports_metrics():
    torch.manual_seed(0)
    images, labels = _tiny_data()
    model = build_model("resnet20", num_classes=4).to(memory_format=torch.channels_last)
    opt = make_optimizer(model, OptimConfig(lr=0.05))
    sched = make_scheduler(opt, 0.05, ScheduleConfig(warmup_epochs=0), 3)
    history = [train_one_epoch(Training(model, opt, sched), LabeledImages(images, labels),
                               epoch_batches(96, 32, 1, 0, epoch, 0), torch.Generator().manual_seed(epoch))
               for epoch in range(4)]
    assert set(history[-1]) == {"loss", "acc", "images_per_s", "lr", "time_s", "count"}
    assert history[-1]["count"] == 96
    assert history[-1]["images_per_s"] > 0 and history[-1]["lr"] == pytest.approx(0.05)  # LambdaLR's float64 product
    assert history[-1]["loss"] < history[0]["loss"], [m["loss"] for m in history]
    assert 0 <= history[-1]["acc"] <= 100


def test_evaluate_counts_only_the_given_indices():
    images, labels = _tiny_data(50)
    model = build_model("resnet20", num_classes=4)
    whole = evaluate(model, LabeledImages(images, labels), batch_size=7)
    parts = [evaluate(model, LabeledImages(images, labels), torch.arange(a, b), batch_size=7)
             for a, b in ((0, 20), (20, 50))]
    assert whole["count"] == 50 and [p["count"] for p in parts] == [20, 30]
    # acc is 100 * correct / count in float64: undoing it gives the counts back to ~1e-15, which approx absorbs
    correct = sum(p["acc"] * p["count"] for p in parts) / 100
    assert correct == pytest.approx(whole["acc"] * 50 / 100)


def test_channels_last_and_plain_layout_take_the_same_step():
    images, labels = _tiny_data(32)
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = build_model("resnet20", num_classes=4)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = make_optimizer(model, OptimConfig())
        sched = make_scheduler(opt, 0.1, ScheduleConfig(warmup_epochs=0), 1)  # a full-size step (lr 0.1)
        before = model.linear.weight.detach().clone()
        train_one_epoch(Training(model, opt, sched), LabeledImages(images, labels), epoch_batches(32, 32, 1, 0, 0, 0),
                        torch.Generator().manual_seed(0), StepSettings(channels_last=channels_last, amp="fp32"))
        results.append(model.linear.weight.detach().clone())
        assert (results[-1] - before).abs().max() > 1e-3  # the step moved the weights far more than the tolerance
    # fp32 on every CPU (perf.amp auto is bf16 on AMX, whose rounding would follow each layout's kernels): the two
    # layouts' float32 kernels may sum in another order (seen: equal bits on AMD EPYC).
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)
