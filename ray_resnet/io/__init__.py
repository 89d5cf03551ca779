"""Where runs live (no Ray, no training): URIs and files through pyarrow.fs, run dirs, the environment record.
"""
