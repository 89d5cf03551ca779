"""The commands: the `ray-resnet` CLI and what only it runs (report, export, the TensorBoard server).
"""
