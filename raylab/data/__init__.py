"""Datasets: raw-format readers, converters to Parquet shard folders, splits and inspection.

Modules:
    shards: generic folder of ``*.parquet`` shards plus ``manifest.json``.
    jigsaws: JIGSAWS kinematics reader, converter and synthetic sample writer.
    imagefolder: ImageFolder (``<split>/<class>/<img>``) converter, split access, sample.
    clear: CLEAR stream (one shard folder per time bucket) converter and the synthetic
        drift-stream sample.
    coco: COCO instances (detection, instance masks) converter, readers, ground-truth JSON.
    detection_sample: the synthetic COCO-format detection sample.
    splits: cross-validation folds (LOSO, LOUO, hold-out) over trial names.
    inspect: summary of a shard folder for ``raylab data inspect``.
"""
