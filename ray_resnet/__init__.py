"""CIFAR ResNets of He et al. (2015), trained with Ray Train and swept with Ray Tune.

The layers, each a package; imports only go down the list:
  apps/      the commands: the `ray-resnet` CLI, report, export, the TensorBoard server
  raytrain/  the Ray layer, the only code that imports Ray: driver, per-worker adapter, cluster, sweep
  core/      the method in pure PyTorch: models, data, steps, the epoch loop, checkpoints, collectives
  io/        where runs live: URIs through pyarrow.fs, run dirs, the environment record
config.py (the frozen config tree), constants.py and errors.py serve every layer; timm.py registers the models
with timm when imported.
"""
