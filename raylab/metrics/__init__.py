"""Metrics as standalone objects with ``update``/``result``/``reset`` (avalanche style).

``classification``: accuracy, per-class precision/recall/F1, confusion matrices and
per-trial majority votes. Counts are plain int64 arrays so that workers can sum them.
"""
