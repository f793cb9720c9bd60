"""The ``raylab`` command line: thin argument parsing over the library.

Bad input of any kind ends in one line on stderr (``raylab: error: ...``) and exit code 2;
only genuine bugs show a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from raylab.errors import ConfigError, RaylabError


def _run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale-out and storage")
    g.add_argument("--workers", default="1",
                   help="data-parallel Train workers: N, or MIN-MAX for an elastic run that "
                        "continues on fewer workers after a lost node (0 = in the driver "
                        "process)")
    g.add_argument("--cpus-per-worker", default="auto",
                   help="CPUs (and torch threads) per Train worker; auto: raylab train on "
                        "a local cluster shares this machine's cores between the workers, "
                        "tune and joined clusters use 1")
    g.add_argument("--gpus-per-worker", type=float, default=0.0)
    g.add_argument("--storage", default=os.environ.get("RAYLAB_STORAGE", "runs"),
                   help="local folder or s3:// / gs:// URI for checkpoints and results")
    g.add_argument("--name", default="", help="experiment name (default METHOD-TIMESTAMP)")
    g.add_argument("--max-failures", type=int, default=0,
                   help="worker failures to recover from via the last checkpoint")
    g.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    g.add_argument("--verbose", action="store_true",
                   help="also show Ray's own log lines from its workers and actors")


def _config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("method", help="a registered method (see `raylab methods`)")
    p.add_argument("--config", default=None, help="YAML file of config values")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--data", default=None, help="shard folder (same as --set data=DST)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("methods", help="list registered methods")

    data = sub.add_parser("data", help="convert, inspect and sample datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    conv = dsub.add_parser(
        "convert", help="raw dataset -> Parquet shards + manifest.json",
        usage="raylab data convert {jigsaws,imagefolder,clear} SRC DST [options]\n"
              "       raylab data convert coco IMAGES ANNOTATIONS.json DST [--skip-bad] "
              "[--overwrite]\n"
              "       raylab data convert segmentation IMAGES MASKS DST --classes MAP "
              "[--splits NAME=FOLDER,...] [--five-crop RATIO] [--skip-bad] [--overwrite]\n"
              "       raylab data convert pool IMAGES DST [--timestamps mtime|exif|CSV] "
              "[--skip-bad] [--overwrite]")
    conv.add_argument("format", choices=list(_CONVERT_PATHS), help="raw dataset format")
    conv.add_argument("paths", nargs="+", metavar="PATH",
                      help="SRC DST; for coco: IMAGES (the image folder) ANNOTATIONS.json "
                           "(COCO instances) DST; for segmentation: IMAGES MASKS DST (roots "
                           "of IMAGES/<split>/* and MASKS/<split>[annot]/<stem>.png)")
    conv.add_argument("--tasks", nargs="+", default=None, help="subset of tasks (JIGSAWS)")
    conv.add_argument("--splits", default=None, metavar="A,B",
                      help="comma-separated split folders, e.g. train,test (imagefolder; "
                           "default: all); segmentation: NAME=FOLDER entries, e.g. "
                           "train=train2017,val=val2017 (a bare FOLDER keeps its name)")
    conv.add_argument("--skip-bad", action="store_true",
                      help="skip and record files that are not decodable images "
                           "(imagefolder, clear), bad annotations and images (coco), "
                           "images with a missing or bad mask (segmentation), or images "
                           "that do not decode or lack a timestamp (pool); "
                           "default: fail listing them")
    conv.add_argument("--classes", default=None, metavar="A,B|MAP",
                      help="clear: comma-separated class names to keep (default: all); "
                           "segmentation (required): the class map: camvid, a COCO panoptic "
                           "categories JSON (27 coarse COCO-Stuff classes), or a YAML/JSON "
                           "file {classes: [..], map: {value: class}, void: [..]}")
    conv.add_argument("--buckets", default=None, metavar="SPEC",
                      help="buckets to convert, e.g. 1-5 or 0,2,3 (clear; default: all)")
    conv.add_argument("--five-crop", type=float, default=None, metavar="RATIO",
                      help="segmentation: cut each train image into 5 square crops of side "
                           "RATIO * min(height, width), e.g. 0.5 (default: whole images)")
    conv.add_argument("--timestamps", default=None, metavar="mtime|exif|CSV",
                      help="pool: each image's time from its file modification time "
                           "(default), EXIF DateTimeOriginal, or a CSV file with columns "
                           "path,timestamp (POSIX seconds or ISO 8601; UTC when naive)")
    conv.add_argument("--overwrite", action="store_true")
    insp = dsub.add_parser("inspect", help="what a shard folder holds")
    insp.add_argument("dst")
    insp.add_argument("--json", action="store_true", help="one JSON object on stdout")
    samp = dsub.add_parser("sample", help="write a small synthetic raw sample")
    samp.add_argument("format", choices=["jigsaws", "images", "clear", "detection",
                                         "segmentation"])
    samp.add_argument("dst")
    samp.add_argument("--seed", type=int, default=0)
    g = samp.add_argument_group("images (synthetic ImageFolder) and detection (synthetic "
                                "COCO instances)")
    g.add_argument("--classes", type=int, default=None,
                   help="number of classes (default 4; detection 3)")
    g.add_argument("--size", type=int, default=None,
                   help="image side in pixels (default 32; detection 128; segmentation 64)")
    g.add_argument("--train-per-class", type=int, default=None, help="images: default 60")
    g.add_argument("--test-per-class", type=int, default=None, help="images: default 20")
    g.add_argument("--images", type=int, default=None,
                   help="detection: training images (default 64)")
    g.add_argument("--val-images", type=int, default=None,
                   help="detection: validation images (default a quarter of --images)")
    g = samp.add_argument_group("clear (synthetic CLEAR-style stream with drift)")
    g.add_argument("--from", dest="source", default=None, metavar="IMAGEFOLDER",
                   help="ImageFolder to draw the images from (required), e.g. "
                        "../shared/data/cifar10 or a `data sample images` folder")
    g.add_argument("--per-class", type=int, default=None,
                   help="average images per class and bucket (default 40)")
    g.add_argument("--buckets", type=int, default=None,
                   help="buckets including the unlabeled bucket 0 (default 11)")

    train = sub.add_parser("train", help="train and evaluate a method")
    _config_flags(train)
    _run_flags(train)

    tune = sub.add_parser("tune", help="search a method's knobs with Ray Tune")
    tune.add_argument("method", nargs="?", help="a registered method")
    tune.add_argument("--resume", default=None, metavar="EXP",
                      help="continue an interrupted search in experiment folder EXP")
    tune.add_argument("--config", default=None)
    tune.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE")
    tune.add_argument("--data", default=None)
    tune.add_argument("--space", action="append", default=[], metavar="KEY=SPEC",
                      help="e.g. window=[30,60,90], optim.lr=log(1e-4,1e-2), "
                           "model.dropout_fc=(0.2,0.6); default: the method's own space")
    tune.add_argument("--trials", type=int, default=8)
    tune.add_argument("--grace-period", type=int, default=2,
                      help="epochs before ASHA may stop a trial")
    _run_flags(tune)

    analyze = sub.add_parser("analyze", help="table, best config, plots of a Tune experiment")
    analyze.add_argument("experiment")
    analyze.add_argument("--json", action="store_true")

    predict = sub.add_parser("predict", help="a trained model on images: results + pictures")
    predict.add_argument("method", choices=["detection"])
    predict.add_argument("images", help="an image file or a folder of images")
    predict.add_argument("out", help="folder for detections.json, images.json, pictures/")
    predict.add_argument("--checkpoint", required=True,
                         help="a run's model folder (<experiment>/run/model) or checkpoint")
    predict.add_argument("--min-score", type=float, default=0.5,
                         help="draw detections from this score up (all are in the JSON); "
                              "with --pseudo-labels, keep them from this score up")
    predict.add_argument("--pseudo-labels", action="store_true",
                         help="self-training: write OUT as a coco shard folder of the "
                              "detections (a Ray Data job over IMAGES: a coco shard folder "
                              "or a folder of images) for `raylab train detection --set "
                              "pseudo=OUT`")
    predict.add_argument("--actors", type=int, default=1,
                         help="with --pseudo-labels: model replicas (one GPU each where the "
                              "cluster has GPUs)")
    predict.add_argument("--address", default=None,
                         help="Ray cluster address for --pseudo-labels (default: local)")
    predict.add_argument("--verbose", action="store_true",
                         help="also show Ray's own log lines")

    export = sub.add_parser("export", help="several runs on one frozen backbone as one bundle")
    export.add_argument("kind", choices=["multitask"])
    export.add_argument("out", help="a new folder for the bundle")
    export.add_argument("tasks", nargs="+", metavar="NAME=MODEL",
                        help="a task's name and its run's model folder (<experiment>/run/model)")

    curate = sub.add_parser("curate", help="a CLEAR-style stream from a timestamped image "
                                           "pool by CLIP retrieval, and its human review")
    csub = curate.add_subparsers(dest="curate_command", required=True)
    cclear = csub.add_parser(
        "clear", help="embed the pool (Ray Data actor pool), bucket by time, rank by CLIP "
                      "similarity to each class's prompts, write the stream + review page")
    cclear.add_argument("pool", help="a `raylab data convert pool` shard folder")
    cclear.add_argument("dst", help="the CLEAR stream folder to write")
    cclear.add_argument("--queries", required=True,
                        help="YAML: classes (names, or names -> prompts) and templates")
    cclear.add_argument("--model", required=True, metavar="open_clip:ARCH",
                        help="an open_clip architecture, or open_clip:PATH.json for a "
                             "model config of your own")
    cclear.add_argument("--checkpoint", required=True,
                        help="the model's weights, a local file (nothing is downloaded)")
    cclear.add_argument("--buckets", type=int, default=11,
                        help="time buckets by timestamp quantiles; bucket 0 is kept "
                             "unlabeled (default 11, as CLEAR)")
    cclear.add_argument("--edges", default=None,
                        help="fixed bucket edges instead: comma-separated ISO dates or "
                             "POSIX seconds, e.g. 2004-01-01,2005-01-01,2006-01-01")
    cclear.add_argument("--per-class", type=int, default=100,
                        help="images per class per labelled bucket, before ambiguous "
                             "ones are removed")
    cclear.add_argument("--margin", type=float, default=0.0,
                        help="an image whose best and second-best class similarities "
                             "differ by less is ambiguous")
    cclear.add_argument("--background", type=int, default=None,
                        help="background images per bucket, from those ranking lowest "
                             "for every class (default: --per-class; 0: none)")
    cclear.add_argument("--cache", default=None,
                        help="embeddings cache root (default POOL/embeddings): curating "
                             "again with new queries embeds nothing")
    cclear.add_argument("--actors", type=int, default=1,
                        help="model replicas in the embedding job (one GPU each where the "
                             "cluster has GPUs)")
    cclear.add_argument("--batch-size", type=int, default=64, help="images per model call")
    cclear.add_argument("--overwrite", action="store_true")
    cclear.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    cclear.add_argument("--verbose", action="store_true", help="also show Ray's own log lines")
    creview = csub.add_parser("review", help="write DST/review/index.html again")
    creview.add_argument("dst", help="a curated stream folder")
    capply = csub.add_parser("apply-review",
                             help="drop the images a review file rejects from the stream")
    capply.add_argument("dst", help="a curated stream folder")
    capply.add_argument("review", help="the review.json the review page saved")

    table = sub.add_parser("clear-table", help="the CLEAR paper's Table 1 from finished runs")
    table.add_argument("experiments", nargs="+",
                       help="CLEAR run folders, or folders holding them")
    table.add_argument("--out", default=None, help="also write the table (markdown) here")
    table.add_argument("--json", action="store_true", help="print the table as JSON")

    assess = sub.add_parser("assess", help="online skill assessment of one recording")
    assess.add_argument("file", help="JIGSAWS kinematics file (.txt or .txt.gz)")
    assess.add_argument("--checkpoint", required=True)
    assess.add_argument("--out", default=None, help="timeline PNG (default FILE.timeline.png)")
    assess.add_argument("--quiet", action="store_true", help="only the final estimate")

    from raylab.bench import BENCHES

    bench = sub.add_parser("bench", help="benchmarks (figures for BENCHMARKS.md)",
                           epilog="benchmarks: " + "; ".join(
                               f"{name}: {b.about}" for name, b in BENCHES.items()))
    bench.add_argument("name", choices=list(BENCHES))
    bench.add_argument("--data", default=None,
                       help="JIGSAWS shards, or for image benches an image shard folder or "
                            "ImageFolder (default: a fresh sample, or the CIFAR-10 subset)")
    bench.add_argument("--epochs", type=int, default=3)
    bench.add_argument("--workers", type=int, default=1, choices=[0, 1],
                       help="train-overhead, loso: 1 Train worker, or 0 to run the same "
                            "trainer in-process")
    bench.add_argument("--features", default=None,
                       help="clear-table: a DINO checkpoint for the frozen-feature rows")
    bench.add_argument("--seeds", type=int, default=3, help="clear-table: seeds per cell")
    bench.add_argument("--rounds", type=int, default=None,
                       help="startup, loso: alternations of raylab and its baseline")
    bench.add_argument("--processes", type=int, default=None,
                       help="ingest, ingest-images, ingest-detection: processes on each "
                            "side (Ray Data's CPUs, the DataLoader's workers; default 2)")
    bench.add_argument("--out", default=None, help="clear-table: keep the runs here")
    bench.add_argument("--only", nargs="+", default=None, metavar="NAME",
                       help="clear-table: run only these strategies' rows (into --out); "
                            "gpu-steps: convnext, dino or vitdet; "
                            "detection-sample: vitdet or cnn; minivit-cifar: 2-workers, "
                            "or convnext-teacher")

    demo = sub.add_parser("demo", help="sample -> shards -> Tune search -> report, locally")
    demo.add_argument("--out", default="demo_output")
    demo.add_argument("--trials", type=int, default=4)
    return parser


def _run_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The scale-out and storage flags as :func:`raylab.api.train`'s keyword arguments."""
    return {"workers": args.workers, "cpus_per_worker": args.cpus_per_worker,
            "gpus_per_worker": args.gpus_per_worker, "storage": args.storage,
            "name": args.name, "max_failures": args.max_failures, "address": args.address,
            "verbose": args.verbose}


def cmd_methods(args: argparse.Namespace) -> int:
    from raylab.registry import list_methods

    for name, method in list_methods().items():
        print(f"{name:<12} {method.paper}")
    return 0


#: The ``data sample`` size flags and the formats that take them.
_SAMPLE_FLAGS = {"classes": ("images", "detection"),
                 "size": ("images", "detection", "segmentation"),
                 "train_per_class": ("images",), "test_per_class": ("images",),
                 "images": ("detection",), "val_images": ("detection",)}
#: The positional paths each ``data convert`` format takes (the last is the output).
_CONVERT_PATHS = {"jigsaws": ("SRC", "DST"), "imagefolder": ("SRC", "DST"),
                  "clear": ("SRC", "DST"), "coco": ("IMAGES", "ANNOTATIONS.json", "DST"),
                  "segmentation": ("IMAGES", "MASKS", "DST"), "pool": ("IMAGES", "DST")}


def _only_for(args: argparse.Namespace, fmt: str | tuple[str, ...],
              flags: dict[str, bool]) -> None:
    """Refuse flags given for another format than the one(s) they belong to."""
    fmts = (fmt,) if isinstance(fmt, str) else fmt
    given = [name for name, is_set in flags.items() if is_set]
    if args.format not in fmts and given:
        raise RaylabError(f"{', '.join(given)}: only for {' or '.join(fmts)}, "
                          f"not {args.format}")


def cmd_data(args: argparse.Namespace) -> int:
    from raylab.data import clear, imagefolder, jigsaws
    from raylab.data.inspect import format_inspection, inspect_shards

    if args.data_command == "convert":
        _only_for(args, "jigsaws", {"--tasks": args.tasks is not None})
        _only_for(args, ("imagefolder", "segmentation"), {"--splits": args.splits is not None})
        _only_for(args, ("imagefolder", "clear", "coco", "segmentation", "pool"),
                  {"--skip-bad": args.skip_bad})
        _only_for(args, "pool", {"--timestamps": args.timestamps is not None})
        _only_for(args, ("clear", "segmentation"), {"--classes": args.classes is not None})
        _only_for(args, "clear", {"--buckets": args.buckets is not None})
        _only_for(args, "segmentation", {"--five-crop": args.five_crop is not None})
        expected = _CONVERT_PATHS[args.format]
        if len(args.paths) != len(expected):
            raise RaylabError(f"data convert {args.format}: expected {len(expected)} paths "
                              f"({' '.join(expected)}), got {len(args.paths)}")
        if args.format == "coco":
            return _convert_coco(args)
        if args.format == "segmentation":
            return _convert_segmentation(args)
        if args.format == "pool":
            return _convert_pool(args)
        args.src, args.dst = args.paths
        if args.format == "clear":
            summary = clear.convert_clear(args.src, args.dst, classes=args.classes,
                                          buckets=args.buckets, skip_bad=args.skip_bad,
                                          overwrite=args.overwrite)
        elif args.format == "imagefolder":
            splits = None if args.splits is None else args.splits.split(",")
            summary = imagefolder.convert_imagefolder(args.src, args.dst, splits=splits,
                                                      skip_bad=args.skip_bad,
                                                      overwrite=args.overwrite)
        else:
            summary = jigsaws.convert_jigsaws(args.src, args.dst, tasks=args.tasks,
                                              overwrite=args.overwrite)
        print(json.dumps(summary, indent=2, default=str))
    elif args.data_command == "inspect":
        info = inspect_shards(args.dst)
        print(json.dumps(info, default=str) if args.json else format_inspection(info))
    elif args.data_command == "sample":
        given = {k: getattr(args, k) for k in _SAMPLE_FLAGS if getattr(args, k) is not None}
        for key in given:
            _only_for(args, _SAMPLE_FLAGS[key], {"--" + key.replace("_", "-"): True})
        _only_for(args, "clear", {"--from": args.source is not None,
                                  "--per-class": args.per_class is not None,
                                  "--buckets": args.buckets is not None})
        if args.format == "clear":
            path = _clear_sample(args)
            print(f"wrote a synthetic CLEAR-style stream (drift documented in README.txt) "
                  f"to {path}")
        elif args.format == "images":
            path = imagefolder.write_image_sample(args.dst, seed=args.seed, **given)
            print(f"wrote a synthetic ImageFolder image sample to {path}")
        elif args.format == "segmentation":
            from raylab.data.segmentation import write_segmentation_sample

            path = write_segmentation_sample(args.dst, seed=args.seed, **given)
            print(f"wrote a synthetic segmentation sample to {path} (convert it: raylab data "
                  f"convert segmentation {path}/images {path}/masks SHARDS --classes "
                  f"{path}/classes.yaml)")
        elif args.format == "detection":
            from raylab.data.detection_sample import write_detection_sample

            path = write_detection_sample(args.dst, seed=args.seed, **given)
            print(f"wrote a synthetic COCO-format detection sample to {path} (convert a "
                  f"split: raylab data convert coco {path}/images/train "
                  f"{path}/annotations/instances_train.json SHARDS)")
        else:
            path = jigsaws.write_sample(args.dst, seed=args.seed)
            print(f"wrote a synthetic JIGSAWS-format sample to {path}")
    return 0


def _convert_coco(args: argparse.Namespace) -> int:
    from raylab.data.coco import convert_coco

    images, annotations, dst = args.paths
    manifest = convert_coco(images, annotations, dst, skip_bad=args.skip_bad,
                            overwrite=args.overwrite)
    extra = manifest["extra"]
    skipped = extra["skipped"]
    summary = {"rows": manifest["rows"], **extra["counts"],
               "categories": len(extra["categories"]), "skipped": len(skipped),
               "shards": len(manifest["shards"]), "dst": str(dst)}
    print(json.dumps(summary, indent=2))
    if skipped:
        kinds = {k: sum(1 for s in skipped if s["kind"] == k) for k in ("image", "annotation")}
        print(f"raylab: skipped {kinds['image']} bad image(s) and {kinds['annotation']} bad "
              f"annotation(s), listed under extra.skipped in {Path(dst) / 'manifest.json'}",
              file=sys.stderr)
    return 0


def _convert_segmentation(args: argparse.Namespace) -> int:
    from raylab.data.segmentation import convert_segmentation

    if args.classes is None:
        raise RaylabError("data convert segmentation: --classes MAP is required: camvid, a "
                          "COCO panoptic categories JSON (e.g. coco128/annotations/"
                          "panoptic_categories.json), or a YAML/JSON file {classes: [..], "
                          "map: {value: class}, void: [..]}")
    images, masks, dst = args.paths
    manifest = convert_segmentation(images, masks, dst, classes=args.classes,
                                    splits=args.splits, five_crop=args.five_crop or 0.0,
                                    skip_bad=args.skip_bad, overwrite=args.overwrite)
    extra = manifest["extra"]
    skipped = extra["skipped"]
    summary = {"rows": manifest["rows"], "splits": extra["counts"],
               "classes": len(extra["class_names"]), "class_names": extra["class_names"],
               "five_crop": extra["five_crop"], "skipped": len(skipped),
               "shards": len(manifest["shards"]), "dst": str(dst)}
    print(json.dumps(summary, indent=2))
    if skipped:
        print(f"raylab: skipped {len(skipped)} image(s), listed under extra.skipped in "
              f"{Path(dst) / 'manifest.json'}", file=sys.stderr)
    return 0


def _convert_pool(args: argparse.Namespace) -> int:
    from raylab.data.pool import convert_pool

    images, dst = args.paths
    summary = convert_pool(images, dst, timestamps=args.timestamps or "mtime",
                           skip_bad=args.skip_bad, overwrite=args.overwrite)
    skipped = summary["skipped"]
    print(json.dumps({**summary, "skipped": len(skipped)}, indent=2))
    if skipped:
        print(f"raylab: skipped {len(skipped)} image(s), listed under extra.skipped in "
              f"{Path(dst) / 'manifest.json'}", file=sys.stderr)
    return 0


def _clear_sample(args: argparse.Namespace) -> Path:
    from raylab.data.clear import write_clear_sample

    if args.source is None:
        raise RaylabError("sample clear: --from IMAGEFOLDER is required (the images to draw "
                          "from, e.g. ../shared/data/cifar10)")
    sizes = {"n_buckets": args.buckets, "per_class_per_bucket": args.per_class}
    return write_clear_sample(args.source, args.dst, seed=args.seed,
                              **{k: v for k, v in sizes.items() if v is not None})


def cmd_train(args: argparse.Namespace) -> int:
    from raylab import api
    from raylab.registry import get_method

    run = api.train(args.method, data=args.data, config=args.config,
                    overrides=args.overrides, **_run_kwargs(args))
    get_method(run.method).print_summary(run.summary)
    print(f"\nresults: {run.experiment}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from raylab import api
    from raylab.runtime.analysis import collect, format_table, write_report

    if args.resume:
        run = api.resume_search(args.resume, address=args.address, verbose=args.verbose)
    else:
        if not args.method:
            raise RaylabError("raylab tune: give a METHOD or --resume EXP")
        run = api.tune_search(args.method, data=args.data, config=args.config,
                              overrides=args.overrides, space=args.space or None,
                              trials=args.trials, grace_period=args.grace_period,
                              **_run_kwargs(args))
    result = collect(run.experiment)
    out = write_report(result)
    print("\n" + format_table(result))
    _print_best(result, out)
    # An interrupted search is not a success: scripts (and `ray job submit`) must see it.
    return 130 if run.unfinished else 0


def _print_best(result: dict[str, Any], out: Path | str) -> None:
    best = result["best"]
    if best is not None:
        print(f"\nbest trial {best['trial']}: {result['metric']} = {best[result['metric']]:.4f}"
              f" with " + ", ".join(f"{k}={best[k]}" for k in result["knobs"]))
        print(f"best checkpoint: {best['checkpoint']}")
    print(f"report: {str(out).rstrip('/')}/report.md")
    print(f"TensorBoard: tensorboard --logdir {result['experiment']}")


def cmd_analyze(args: argparse.Namespace) -> int:
    from raylab.runtime.analysis import collect, format_table, write_report

    result = collect(args.experiment)
    out = write_report(result)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "curves"}, default=str))
        return 0
    print(format_table(result))
    if result["best_config"]:
        print("\nbest config:")
        for k, v in result["best_config"].items():
            print(f"  {k}: {v}")
    _print_best(result, out)
    return 0


def cmd_clear_table(args: argparse.Namespace) -> int:
    from raylab.config import atomic_write_text
    from raylab.methods.clear.table import (
        build_table,
        find_summaries,
        format_markdown,
        load_summaries,
    )

    table = build_table(load_summaries(find_summaries(args.experiments)))
    text = format_markdown(table)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(json.dumps(table, indent=2) if args.json else text)
    return 0


def cmd_assess(args: argparse.Namespace) -> int:
    from raylab.methods.skill.assess import assess_file

    assess_file(args.checkpoint, args.file, out=args.out, quiet=args.quiet)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from raylab.tasks.detection.predict import predict_folder

    if args.pseudo_labels:
        from raylab.runtime.cluster import cluster_resources, ensure_ray
        from raylab.tasks.detection.pseudo import pseudo_label

        if args.actors < 1:
            raise ConfigError(f"--actors must be >= 1, got {args.actors}")
        ensure_ray(args.address, verbose=args.verbose)
        gpus = 1.0 if cluster_resources().get("GPU", 0) >= 1 else 0.0
        manifest = pseudo_label(args.checkpoint, args.images, args.out,
                                threshold=args.min_score, actors=args.actors,
                                gpus_per_actor=gpus)
        counts = manifest["extra"]["counts"]
        print(f"{counts['instances']} pseudo-labels (score >= {args.min_score:g}) on "
              f"{counts['images']} images ({counts['images_without_instances']} without) -> "
              f"{args.out}; train on them with --set pseudo={args.out}")
        return 0
    done = predict_folder(args.checkpoint, args.images, args.out, min_score=args.min_score)
    print(f"{done['detections']} detections on {done['images']} images -> {done['out']}")
    return 0


class _EmbeddingProgress:
    """A line each time the embedding job passes another twentieth of its images (and at
    its end): images done, img/s and the time left, so that a long job shows it moves."""

    def __init__(self, steps: int = 20) -> None:
        self.steps = steps
        self.start = time.perf_counter()
        self.shown = 0

    def __call__(self, done: int, total: int) -> None:
        from raylab.engine.progress import format_duration

        if done < total and done - self.shown < total / self.steps:
            return
        self.shown = done
        seconds = time.perf_counter() - self.start
        rate = done / seconds if seconds > 0 else 0.0
        left = (f", {format_duration((total - done) / rate)} left" if rate and done < total
                else "")
        print(f"embedded {done}/{total} images ({rate:.1f} img/s{left})", flush=True)


def cmd_curate(args: argparse.Namespace) -> int:
    if args.curate_command == "review":
        from raylab.curation.review import write_review

        print(f"review page: {write_review(args.dst)}")
        return 0
    if args.curate_command == "apply-review":
        from raylab.curation.review import apply_review

        done = apply_review(args.dst, args.review)
        print(f"removed {done['rejected']} rejected image(s): {done['rows_before']} -> "
              f"{done['rows_after']} rows in {args.dst}; review page rewritten")
        return 0
    from raylab.curation.curate import curate_clear
    from raylab.runtime.cluster import cluster_resources, ensure_ray

    if args.actors < 1:
        raise ConfigError(f"--actors must be >= 1, got {args.actors}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    edges = None if args.edges is None else [e.strip() for e in args.edges.split(",")
                                            if e.strip()]
    ensure_ray(args.address, verbose=args.verbose)
    resources = cluster_resources()
    gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    # On a local cluster's CPUs the actors share this machine's cores (Ray would give
    # each actor of 1 CPU one thread); on a joined cluster, scale out with --actors.
    threads = (max(1, (os.cpu_count() or 1) // args.actors)
               if not gpus and args.address is None else None)
    done = curate_clear(args.pool, args.dst, queries=args.queries, model=args.model,
                        checkpoint=args.checkpoint, buckets=args.buckets, edges=edges,
                        per_class=args.per_class, margin=args.margin,
                        background=args.background, cache=args.cache, actors=args.actors,
                        gpus_per_actor=gpus, batch_size=args.batch_size,
                        threads=threads, overwrite=args.overwrite,
                        progress=_EmbeddingProgress())
    speed = (f"{done['embedded']} embedded at {done['images_per_second']:.1f} img/s"
             if done["embedded"] else "all from the cache")
    print(f"embeddings: {speed}, {done['cached']} cached ({done['model_id']})")
    print(f"{done['rows']} images in {len(done['bucket_rows'])} buckets -> {done['dst']} "
          f"({done['ambiguous']} ambiguous removed, {done['background']} background, "
          f"{done['outside_edges']} outside the edges)")
    print(f"review: {done['review']}; then raylab curate apply-review {args.dst} "
          f"review.json; train: raylab train clear --data {args.dst}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from raylab.export import export_multitask

    tasks: dict[str, str] = {}
    for item in args.tasks:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"task {item!r}: expected NAME=MODEL_FOLDER")
        if name in tasks:
            raise ConfigError(f"task name {name!r} given twice")
        tasks[name] = path
    report = export_multitask(tasks, args.out)
    mb = 2**20
    print(f"{'task':<16} {'method':<10} {'model alone MB':>14} {'adds to bundle MB':>17}")
    for name, t in report["tasks"].items():
        print(f"{name:<16} {str(t['method']):<10} {t['alone_bytes'] / mb:>14.2f} "
              f"{t['own_bytes'] / mb:>17.2f}")
    print(f"shared ({report['shared_tensors']} tensors, stored once): "
          f"{report['shared_bytes'] / mb:.2f} MB")
    print(f"bundle {report['bundle_bytes'] / mb:.2f} MB vs {report['separate_bytes'] / mb:.2f} "
          f"MB as separate models: {report['saved_bytes'] / mb:.2f} MB saved -> {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from raylab import bench

    bench.run(args.name, bench.BenchOptions(
        data=args.data, epochs=args.epochs, workers=args.workers, features=args.features,
        seeds=args.seeds, rounds=args.rounds, processes=args.processes, out=args.out,
        only=args.only))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from raylab.demo import run_demo

    run_demo(Path(args.out), trials=args.trials)
    return 0


COMMANDS = {"methods": cmd_methods, "data": cmd_data, "train": cmd_train, "tune": cmd_tune,
            "analyze": cmd_analyze, "clear-table": cmd_clear_table, "assess": cmd_assess,
            "predict": cmd_predict, "export": cmd_export, "curate": cmd_curate,
            "bench": cmd_bench,
            "demo": cmd_demo}


def find_raylab_error(exc: BaseException) -> RaylabError | None:
    """The RaylabError behind ``exc``, also when Ray wrapped it in a worker failure."""
    from raylab.errors import exception_chain

    for e in exception_chain(exc):
        if isinstance(e, RaylabError):
            # Ray re-raises a task's exception as a subclass of both RayTaskError and the
            # original type; its `cause` is the original with the clean message.
            cause = getattr(e, "cause", None)
            return cause if isinstance(cause, RaylabError) else e
    return None


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        import raylab.bench

        raylab.bench.COMMAND_START = started
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("raylab: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for bad input, a traceback only for real bugs
        err = find_raylab_error(exc)
        if err is None:
            from raylab.errors import shard_read_error

            err = shard_read_error(exc)  # a shard broke outside a Train run (driver reads)
        if err is None:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"raylab: error: {message}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
