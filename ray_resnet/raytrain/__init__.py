"""The Ray layer, the only code that imports Ray: the driver, the per-worker adapter, cluster resources and
runtime env, the Tune sweep, and how failures end a run.
"""
