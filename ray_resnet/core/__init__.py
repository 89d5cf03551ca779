"""The method, in pure PyTorch (never Ray): models, data (datasets, batches, augmentation), the steps, the epoch loop,
checkpoint state, collectives, global BatchNorm, TensorBoard logs. Tested alone in milliseconds.
"""
