"""The pure modules, and every command but train and sweep, never load Ray (each check in a fresh interpreter)."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ray_resnet"
RAY_LAYER = PACKAGE / "raytrain"
# Every module outside the Ray layer, by its dotted name.
PURE = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
              for p in PACKAGE.rglob("*.py") if RAY_LAYER not in p.parents and p.name != "__main__.py")


def _python(code: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_importing_the_pure_modules_leaves_ray_unloaded(tmp_path):
    assert len(PURE) > 20 and "ray_resnet.core.loop" in PURE and "ray_resnet.timm" in PURE
    imports = "; ".join(f"import {name}" for name in PURE if name != "ray_resnet.timm") + "; import ray_resnet.timm"
    assert _python(f"import sys; {imports}; print('ray' in sys.modules)", tmp_path) == "False"


def test_eval_export_report_status_tensorboard_and_help_never_import_ray(tmp_path):
    out = _python("""
        import os, sys, yaml
        from fixtures import random_cifar, trained_like, write_parquet_cifar
        from torch.utils.tensorboard import SummaryWriter
        from ray_resnet.apps import cli
        from ray_resnet.core.checkpoint import CheckpointState, save_checkpoint
        from ray_resnet.config import Config, save_config, to_dict

        write_parquet_cifar("data", *random_cifar(20), "test")
        config = to_dict(Config(model="resnet20"))
        save_checkpoint(CheckpointState(trained_like().state_dict(), config, 1), "sweep/r-s0/best")
        save_config(Config(model="resnet20"), "sweep/r-s0/config.yaml")
        with SummaryWriter("sweep/r-s0/tb") as w:
            w.add_scalar("test/acc", 10.0, 1)
        open("sweep/sweep.yaml", "w").write(yaml.safe_dump({"name": "s", "grid": {"seed": [0]}}))
        os.execv = lambda *argv: print("exec", argv[0])  # `tensorboard` replaces itself by TensorBoard
        commands = {
            "eval": ["eval", "--checkpoint", "sweep/r-s0", "--data", "data"],
            "export": ["export", "--checkpoint", "sweep/r-s0", "--data", "data", "--format", "state_dict",
                       "--output", "r.pt"],
            "report": ["report", "sweep"],
            "status": ["status", "sweep"],
            "tensorboard": ["tensorboard", "sweep"],
            "--help": ["--help"],
        }
        loaded = []
        for name, argv in commands.items():
            try:
                assert cli.main(argv) == 0, name
            except SystemExit as e:  # --help
                assert e.code == 0
            if "ray" in sys.modules:
                loaded.append(name)
        print("ray loaded by:", loaded)
    """, tmp_path)
    assert out == "ray loaded by: []"
