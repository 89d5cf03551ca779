"""fp32 vs bf16, and the engine vs the model alone, side by side on one machine; writes bench/PRECISION.md.

    python -m bench.precision                                   # from the repo root
    python -m bench.precision --weights-dir DIR                 # also: published weights' accuracy in both

For every model and precision, a fresh subprocess measures, on one model:
  engine      `fit.fit` without Ray (path b of bench.throughput): `--warmup` + `--steps` training steps of the
              recipe's batch, augmentation and metrics included;
  model only  the ceiling: forward + backward + SGD step (same loss, autocast, channels_last, optimizer and lr
              schedule) on batches augmented beforehand, so engine / model only is what the data path costs;
  eval        `engine.evaluate` of `--eval-images` test images in that precision (after one untimed pass).
Runs are interleaved (model x precision, repeated) so that load from other users hits all alike; tables show
medians. `--weights-dir` holds akamaster/pytorch_resnet_cifar10's files (resnet20-12fca82f.th, ...): each found is
evaluated on the whole test set in fp32 and in bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.throughput import REPO, RESULT_TAG, StepStamps, bench_config, engine_setup, machine
from ray_resnet.config import Config, replace

PRECISIONS = ("fp32", "bf16")
CEILING_GOAL = 0.9  # engine / model only: the data path may cost at most 10 % of the step rate
PRECOMPUTED_BATCHES = 8  # model-only steps cycle through this many augmented batches


def engine_images_per_s(cfg: Config, training, data, device: torch.device, warmup: int, steps: int) -> float:
    from ray_resnet.core.loop import fit

    stamps = StepStamps(device, warmup + steps, warmup)
    fit(cfg, training, data, hooks=[stamps])
    return stamps.steady_images_per_s()


def model_only_images_per_s(cfg: Config, training, data, device: torch.device, warmup: int, steps: int) -> float:
    """forward + backward + SGD step of the engine's model on batches augmented beforehand."""
    from ray_resnet.core.augment import augment
    from ray_resnet.core.batches import epoch_batches
    from ray_resnet.core.loop import epoch_generator
    from ray_resnet.core.precision import autocast

    generator = epoch_generator(cfg.seed, 0, device)
    batches = []
    for step in epoch_batches(len(data.train_index), cfg.optim.batch_size, 1, 0, 0, cfg.seed)[:PRECOMPUTED_BATCHES]:
        index = data.train_index[step.indices]
        x = augment(data.train_images[index].to(device), generator, erase_p=cfg.data.erase_p)
        batches.append((x.contiguous(memory_format=torch.channels_last) if cfg.perf.channels_last else x,
                        data.train_labels[index].to(device)))
    training.model.train()
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        x, y = batches[i % len(batches)]
        with autocast(device, cfg.perf.amp):
            logits = training.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.optim.label_smoothing)
        training.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        training.optimizer.step()
        training.scheduler.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * cfg.optim.batch_size / (time.perf_counter() - start)


def eval_images_per_s(cfg: Config, training, data, precision: str) -> float:
    from ray_resnet.core.steps import LabeledImages, StepSettings, evaluate

    def run() -> dict:
        return evaluate(training.core, LabeledImages(data.test_images, data.test_labels), data.test_index,
                        batch_size=cfg.perf.eval_batch_size, settings=StepSettings.of(cfg), precision=precision)

    run()  # untimed: the first pass allocates and picks kernels
    return run()["images_per_s"]


def measure(args: argparse.Namespace, model: str, precision: str) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = replace(bench_config(argparse.Namespace(**{**vars(args), "model": model, "batchnorm": "global"})),
                  perf={"amp": precision})
    data, training = engine_setup(cfg, device)
    return {"engine": engine_images_per_s(cfg, training, data, device, args.warmup, args.steps),
            "model_only": model_only_images_per_s(cfg, training, data, device, args.warmup, args.steps),
            "eval": eval_images_per_s(cfg, training, data, precision)}


def weights_accuracy(weights_dir: Path, models: list[str], data_root: str) -> list[dict]:
    """Top-1 on the whole test set in fp32 and bf16 for each published weights file found in `weights_dir`."""
    from ray_resnet.core.datasets import load_cifar
    from ray_resnet.core.steps import LabeledImages, evaluate
    from ray_resnet.core.weights import model_from_weights

    images, labels = load_cifar(data_root, "test")
    rows = []
    for model in models:
        for path in sorted(weights_dir.glob(f"{model}-*.th")):
            net = model_from_weights(path, model)[0].to(memory_format=torch.channels_last)
            acc = {p: evaluate(net, LabeledImages(images, labels), precision=p)["acc"] for p in PRECISIONS}
            rows.append({"model": model, "file": path.name, **acc})
    return rows


def run_child(args: argparse.Namespace, model: str, precision: str) -> dict:
    command = [sys.executable, "-m", "bench.precision", "--child", f"{model}:{precision}", "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--eval-images", str(args.eval_images), "--data", args.data]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"bench {model} {precision} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def render(args: argparse.Namespace, host: dict, runs: dict, weights: list[dict], wall_s: float) -> str:
    from ray_resnet.core.precision import native_bf16, training_precision

    cpu = torch.device("cpu")
    caps = getattr(torch.cpu, "get_capabilities", dict)()
    flags = ", ".join(f for f in ("amx_bf16", "amx_tile", "avx512_bf16") if caps.get(f)) or "none of them"
    lines = [
        "# Precision: fp32 vs bf16, and the engine vs the model alone",
        "",
        "Generated by `python -m bench.precision " + " ".join(sys.argv[1:]) + f"` in {wall_s / 60:.1f} min; "
        "do not edit by hand.",
        "",
        f"- Machine: {host['cpu']}, {host['cores']} cores, {host['memory_gib']} GiB, GPU: {host['gpu']}; bf16 "
        f"matrix flags (torch.cpu.get_capabilities): {flags}; native bf16: {native_bf16(cpu)}, so `perf.amp: auto` "
        f"trains in {training_precision(cpu, 'auto')} here",
        f"- Software: {host['versions']}",
        f"- Date: {host['date']}; load average (1/5/15 min) {host['load_average']} at the start",
        f"- Workload: batch 128, {args.warmup} warm-up + {args.steps} timed training steps, evaluation of "
        f"{args.eval_images} test images in batches of 500; repeats: {args.repeats}, interleaved, medians.",
        "",
        "| model | precision | engine train img/s | model-only img/s | engine / model only | eval img/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    ceiling = {(m, p): statistics.median(x["engine"] / x["model_only"] for x in runs[m][p])
               for m in args.models for p in PRECISIONS}
    for model in args.models:
        for precision in PRECISIONS:
            r = runs[model][precision]
            lines.append(f"| {model} | {precision} | {statistics.median(x['engine'] for x in r):,.0f} | "
                         f"{statistics.median(x['model_only'] for x in r):,.0f} | {ceiling[model, precision]:.2f} | "
                         f"{statistics.median(x['eval'] for x in r):,.0f} |")
    lines += ["", "bf16 / fp32 (medians of the per-repeat ratios):", ""]
    for model in args.models:
        fp32, bf16 = runs[model]["fp32"], runs[model]["bf16"]
        speedup = {k: statistics.median(b[k] / f[k] for f, b in zip(fp32, bf16)) for k in ("engine", "eval")}
        lines.append(f"- {model}: training {speedup['engine']:.2f}x, evaluation {speedup['eval']:.2f}x")
    lines += ["", f"Goal: engine / model only >= {CEILING_GOAL} (the data path costs at most 10 %): "
              + ", ".join(f"{m} {p} {'met' if ratio >= CEILING_GOAL else 'MISSED'}" for (m, p), ratio in ceiling.items())
              + ".",
              "", "## Per repeat (engine train img/s)", "",
              "| repeat | " + " | ".join(f"{m} {p}" for m in args.models for p in PRECISIONS) + " |",
              "|---|" + "---:|" * (len(args.models) * len(PRECISIONS))]
    for i in range(args.repeats):
        lines.append(f"| {i + 1} | " + " | ".join(f"{runs[m][p][i]['engine']:,.0f}" for m in args.models
                                                   for p in PRECISIONS) + " |")
    if weights:
        lines += ["", "## Published weights: test accuracy by evaluation precision", "",
                  "| model | file | fp32 top-1 % | bf16 top-1 % | bf16 - fp32 (points) |", "|---|---|---:|---:|---:|"]
        lines += [f"| {w['model']} | {w['file']} | {w['fp32']:.2f} | {w['bf16']:.2f} | {w['bf16'] - w['fp32']:+.2f} |"
                  for w in weights]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per run (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-images", type=int, default=2000)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "cifar10"))
    parser.add_argument("--weights-dir", type=Path, help="published weights to evaluate in both precisions")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "PRECISION.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if args.child:
        model, precision = args.child.split(":")
        print(RESULT_TAG + json.dumps(measure(args, model, precision)), flush=True)
        return 0
    host, start = machine(), time.perf_counter()
    runs = {m: {p: [] for p in PRECISIONS} for m in args.models}
    for repeat in range(args.repeats):
        for model in args.models:
            for precision in PRECISIONS:
                result = run_child(args, model, precision)
                runs[model][precision].append(result)
                print(f"repeat {repeat + 1}/{args.repeats} {model} {precision}: " + ", ".join(
                    f"{k} {v:,.0f} img/s" for k, v in result.items()), flush=True)
    weights = weights_accuracy(args.weights_dir, args.models, args.data) if args.weights_dir else []
    report = render(args, host, runs, weights, time.perf_counter() - start)
    args.output.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
