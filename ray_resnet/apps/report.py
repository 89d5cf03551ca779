"""`ray-resnet report SWEEP_DIR`: the sweep's table beside the paper's Table 6 (with a column per recipe when the
sweep grids over `recipe`), and Figure-6-style curves.

Pure: reads the run dirs a sweep wrote (config.yaml, result.json when finished, the per-epoch accuracies in tb/)
and writes report.md, report.csv and curves.png into the sweep dir. Works on a partial sweep: finished
runs make the table, every epoch run so far makes the curves.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import tempfile
from dataclasses import dataclass, field

import yaml

from ray_resnet import config as config_lib
from ray_resnet.config import Config, flatten
from ray_resnet.constants import CONFIG_FILE, NUM_CLASSES, SWEEP_FILE, TB_DIR, TB_TAGS, parse_model_name
from ray_resnet.core.models import build_model, count_parameters
from ray_resnet.errors import ReportError
from ray_resnet.io import storage
from ray_resnet.io.rundir import RunResult, read_result, trial_dirs
from ray_resnet.io.storage import write_atomic, write_text

# He et al. 2015, Table 6: CIFAR-10 test error (%). resnet110 is the best of 5 runs (mean 6.61 +- 0.16).
PAPER_ERROR = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97, "resnet110": 6.43,
               "resnet1202": 7.93}
PAPER_NOTE = {"resnet110": "6.43 (6.61 ± 0.16)"}
FAMILY = {"A": "ResNet", "B": "ResNet, option B", None: "plain"}
CURVE_METRICS = ("train_acc", "test_acc")  # what the curves and the depth trends read from each run's tb/


@dataclass
class Run:
    name: str
    cfg: Config
    group: tuple  # the swept values other than the seed: runs of one group differ only by seed
    finished: RunResult | None  # result.json of a finished run
    diverged: RunResult | None  # result.json of a run whose training loss became NaN/inf
    failed: RunResult | None = None  # result.json of a trial that stopped on an error any rerun would raise
    curve: dict[int, dict] = field(default_factory=dict)  # epoch -> that epoch's metrics

    @property
    def epoch(self) -> int:
        return max(self.curve, default=0)


def read_runs(sweep_dir: str) -> tuple[dict, list[Run]]:
    """The sweep file and every trial run of a sweep dir (local or a URI)."""
    sweep_dir = storage.absolute(sweep_dir)
    if not storage.is_file(storage.join(sweep_dir, SWEEP_FILE)):
        hint = (" (it is one training run: see its result.json and tb/)"
                if storage.is_file(storage.join(sweep_dir, CONFIG_FILE))
                else "" if storage.exists(sweep_dir) else " (it does not exist)")
        raise ReportError(f"{sweep_dir} is not a sweep dir{hint}: expected {SWEEP_FILE} and one run dir per trial, "
                          "as `ray-resnet sweep` writes them (e.g. runs/sweeps/table6)")
    sweep = yaml.safe_load(storage.read_text(storage.join(sweep_dir, SWEEP_FILE)))
    keys = [k for k in [*(sweep.get("grid") or {}), *(sweep.get("search") or {})] if k != "seed"]
    runs = []
    for run_dir in trial_dirs(sweep_dir):
        cfg = config_lib.read_config(storage.join(run_dir, CONFIG_FILE))
        flat = flatten(config_lib.to_dict(cfg))
        result = read_result(run_dir)
        finished = result if result and result.finished else None
        diverged = result if result and result.status == "diverged" else None
        run = Run(storage.name(run_dir), cfg, tuple(flat[k] for k in keys) if keys else (cfg.model,), finished,
                  diverged, result if result and result.status == "error" else None)
        run.curve = read_curve(storage.join(run_dir, TB_DIR))
        runs.append(run)
    sweep["group_keys"] = keys or ["model"]
    return sweep, runs


def read_curve(tb_dir: str) -> dict[int, dict]:
    """epoch -> {"train_acc", "test_acc"} from the run's TensorBoard events (local, or copied from a URI); a
    resumed run's later event file overrides the epochs a crashed attempt logged after its last checkpoint."""
    if storage.is_uri(tb_dir):
        with tempfile.TemporaryDirectory() as local:
            storage.download_dir(tb_dir, local)
            return read_curve(local)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curve: dict[int, dict] = {}
    for events in storage.glob(tb_dir, "events.out.tfevents.*"):  # file names start with their creation time
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        tags = [(key, TB_TAGS[key]) for key in CURVE_METRICS if TB_TAGS[key] in acc.Tags()["scalars"]]
        file_curve: dict[int, dict] = {}
        for key, tag in tags:
            for event in acc.Scalars(tag):
                file_curve.setdefault(event.step, {})[key] = event.value
        if file_curve:  # a resumed attempt restarts at its checkpoint: drop what an earlier one logged from there
            curve = {e: m for e, m in curve.items() if e < min(file_curve)} | file_curve
    return {epoch: m for epoch, m in sorted(curve.items()) if len(m) == len(CURVE_METRICS)}


def _mean_and_spread(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(runs: list[Run]) -> list[dict]:
    """One row per group (e.g. per model): final test error over its finished seeds, beside the paper's."""
    rows = []
    params: dict[tuple, int] = {}
    for group in dict.fromkeys(r.group for r in runs):
        members = [r for r in runs if r.group == group]
        cfg = members[0].cfg
        key = (cfg.model, cfg.data.dataset)
        if key not in params:
            params[key] = count_parameters(build_model(cfg.model, NUM_CLASSES[cfg.data.dataset]))
        done = [r for r in members if r.finished]
        errors = [100 - r.finished.final_test_acc for r in done]
        train_errors = [100 - r.curve[r.epoch]["train_acc"] for r in done if r.curve]
        mean, std = _mean_and_spread(errors)
        paper = PAPER_ERROR.get(cfg.model) if cfg.data.dataset == "cifar10" else None
        sem = None if std is None else std / math.sqrt(len(errors))
        rows.append({
            "group": group, "model": cfg.model, "params": params[key], "seeds": len(done),
            "unfinished": [f"{r.name} ({r.epoch}/{r.cfg.schedule.epochs} epochs)" for r in members
                           if not (r.finished or r.diverged or r.failed)],
            "diverged": [f"{r.name} (loss {r.diverged.diverged_loss} in epoch {r.diverged.diverged_epoch})"
                         for r in members if r.diverged],
            "failed": [f"{r.name} ({r.failed.error})" for r in members if r.failed],
            "final_error_mean": mean, "final_error_std": std, "final_error_sem": sem,
            "best_final_error": min(errors, default=None),
            "final_train_error_mean": _mean_and_spread(train_errors)[0],
            "paper_error": paper, "diff_vs_paper": None if mean is None or paper is None else mean - paper,
        })
    return rows


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def _markdown(sweep: dict, sweep_dir: str, runs: list[Run], rows: list[dict]) -> str:
    expected = sweep.get("num_samples", 1)
    for values in (sweep.get("grid") or {}).values():
        expected *= len(values)
    keys = sweep["group_keys"]
    lines = [f"# Sweep `{sweep['name']}`", "",
             f"{sum(1 for r in runs if r.finished)} of {expected} trials finished ({sweep_dir}). "
             "Errors are CIFAR test errors in %, final = after the last epoch; mean ± std over the finished seeds; "
             "best = the lowest final error of those seeds; diff = mean − paper (percentage points).", "",
             "| " + " | ".join([*keys, "params", "seeds", "final error", "best", "paper (Table 6)", "diff"]) + " |",
             "|" + "---|" * (len(keys) + 6)]
    for row in rows:
        error = f"{_fmt(row['final_error_mean'])} ± {_fmt(row['final_error_std'])}"
        paper = PAPER_NOTE.get(row["model"], _fmt(row["paper_error"]))
        lines.append("| " + " | ".join([*(str(v) for v in row["group"]), f"{row['params']:,}", str(row["seeds"]),
                                        error, _fmt(row["best_final_error"]), paper,
                                        _fmt(row["diff_vs_paper"], "+.2f")]) + " |")
    unfinished = [u for row in rows for u in row["unfinished"]]
    if unfinished:
        lines += ["", "Not finished (interrupted, running, or stopped early by ASHA): " + ", ".join(unfinished) + "."]
    diverged = [d for row in rows for d in row["diverged"]]
    if diverged:
        lines += ["", "Diverged (training loss NaN/inf; not counted, not rerun by --resume): " + ", ".join(diverged)
                  + "."]
    failed = [f for row in rows for f in row["failed"]]
    if failed:
        lines += ["", "Failed (an error any rerun would raise again; not counted, not rerun by --resume): "
                  + ", ".join(failed) + "."]
    lines += _recipe_table(sweep, rows)
    lines += _best_selection(runs)
    lines += _depth_trends(rows)
    lines += ["", "![test error vs epoch](curves.png)", ""]
    return "\n".join(lines)


def _recipe_table(sweep: dict, rows: list[dict]) -> list[str]:
    """With `recipe` among the swept keys: a column per recipe (final error, mean ± standard error over its
    finished seeds, n) for each value of the other swept keys (e.g. each depth, shallow first), beside the paper's
    Table 6. Recipes in the order the sweep lists them."""
    keys = sweep["group_keys"]
    if "recipe" not in keys:
        return []
    at = keys.index("recipe")
    listed = (sweep.get("grid") or {}).get("recipe") or []
    recipes = list(dict.fromkeys([*listed, *(row["group"][at] for row in rows)]))
    others = [k for k in keys if k != "recipe"]
    cells: dict[tuple, dict] = {}
    for row in sorted(rows, key=lambda row: parse_model_name(row["model"])[0]):
        cells.setdefault(row["group"][:at] + row["group"][at + 1:], {"model": row["model"]})[row["group"][at]] = row
    lines = ["", "By recipe: final test error %, mean ± standard error over the finished seeds (n); the paper's "
             "Table 6 gives single runs, and for ResNet-110 its best of 5 with mean ± std in brackets.", "",
             "| " + " | ".join([*others, *recipes, "paper (Table 6)"]) + " |",
             "|" + "---|" * (len(others) + len(recipes) + 1)]
    for rest, by_recipe in cells.items():
        shown = []
        for recipe in recipes:
            row = by_recipe.get(recipe)
            shown.append("—" if not row or row["final_error_mean"] is None else
                         f"{_fmt(row['final_error_mean'])} ± {_fmt(row['final_error_sem'])} (n={row['seeds']})")
        model = by_recipe["model"]
        lines.append("| " + " | ".join([*(str(v) for v in rest), *shown,
                                        PAPER_NOTE.get(model, _fmt(PAPER_ERROR.get(model)))]) + " |")
    return lines


def _best_selection(runs: list[Run]) -> list[str]:
    """Says plainly which finished runs chose best/ on the test set (no data.val_split)."""
    on_test = [r.name for r in runs if r.finished and r.cfg.data.val_split is None]
    if not on_test:
        return []
    return ["", f"best/ of {len(on_test)} finished run(s) was selected on the test set (no data.val_split), an "
            "optimistic estimate; the tables use the final errors only."]


def _depth_trends(rows: list[dict]) -> list[str]:
    """The degradation check of Figure 6: how final errors move with depth within each shortcut family."""
    families: dict = {}
    for row in rows:
        if row["final_error_mean"] is not None and len(row["group"]) == 1:
            depth, shortcut = parse_model_name(row["model"])
            families.setdefault(shortcut, []).append((depth, row))
    lines = []
    for shortcut, members in families.items():
        if len(members) < 2:
            continue
        members.sort(key=lambda m: m[0])
        trend = ", ".join(f"{d}: {_fmt(r['final_error_mean'])} / {_fmt(r['final_train_error_mean'])}"
                          for d, r in members)
        deeper = members[-1][1]["final_train_error_mean"], members[0][1]["final_train_error_mean"]
        verdict = "" if None in deeper else ("deeper trains worse" if deeper[0] > deeper[1] else "deeper trains better")
        lines.append(f"- {FAMILY[shortcut]}, depth: test / train error % — {trend}" + (f" ({verdict})" if verdict else ""))
    return ["", "Depth trend (final errors, mean over finished seeds):", *lines] if lines else []


def plot_curves(runs: list[Run], path: str) -> None:
    """Test error (bold) and training error (dashed) vs epoch, mean over seeds with min–max shading; one panel
    per shortcut family, as in the paper's Figure 6 (plain left, ResNet middle)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    families = sorted({parse_model_name(r.cfg.model)[1] for r in runs}, key=lambda s: (s is not None, s or ""))
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4.5), squeeze=False)
    for ax, shortcut in zip(axes[0], families):
        members = [r for r in runs if parse_model_name(r.cfg.model)[1] == shortcut and r.curve]
        for group in dict.fromkeys(r.group for r in members):
            seeds = [r for r in members if r.group == group]
            epochs = sorted({e for r in seeds for e in r.curve})
            test = [[100 - r.curve[e]["test_acc"] for r in seeds if e in r.curve] for e in epochs]
            train = [statistics.fmean(100 - r.curve[e]["train_acc"] for r in seeds if e in r.curve) for e in epochs]
            label = " ".join(str(v) for v in group) + f" (n={len(seeds)})"
            (line,) = ax.plot(epochs, [statistics.fmean(t) for t in test], linewidth=2, marker=".", label=label)
            ax.fill_between(epochs, [min(t) for t in test], [max(t) for t in test], color=line.get_color(), alpha=0.2)
            ax.plot(epochs, train, linestyle="--", linewidth=1, color=line.get_color())
        ax.set(title=FAMILY[shortcut], xlabel="epoch", ylabel="error (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("CIFAR test error (bold, mean over seeds, min–max shaded) and training error (dashed)")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, image.getvalue())


@dataclass(frozen=True)
class WrittenReport:
    text: str  # the markdown
    markdown: str  # where each file went
    csv: str
    curves: str


def write_report(sweep_dir: str) -> WrittenReport:
    """report.md, report.csv and curves.png into the sweep dir (local or a URI)."""
    sweep_dir = storage.absolute(sweep_dir)
    sweep, runs = read_runs(sweep_dir)
    if not runs:
        raise ReportError(f"{sweep_dir} holds no trial runs yet (no */config.yaml): wait for the sweep's first "
                          "trials to start")
    rows = summarize(runs)
    report = WrittenReport(_markdown(sweep, sweep_dir, runs, rows), storage.join(sweep_dir, "report.md"),
                           storage.join(sweep_dir, "report.csv"), storage.join(sweep_dir, "curves.png"))
    write_text(report.markdown, report.text)
    table = io.StringIO()
    columns = ["params", "seeds", "final_error_mean", "final_error_std", "final_error_sem", "best_final_error",
               "final_train_error_mean", "paper_error", "diff_vs_paper", "unfinished", "diverged", "failed"]
    writer = csv.writer(table)
    writer.writerow([*sweep["group_keys"], *columns])
    for row in rows:
        writer.writerow([*row["group"], *(";".join(row[c]) if isinstance(row[c], list) else row[c] for c in columns)])
    write_text(report.csv, table.getvalue())
    plot_curves(runs, report.curves)
    return report
