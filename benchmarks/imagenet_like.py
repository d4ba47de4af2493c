"""An ImageFolder shaped exactly like ImageNet's train folder, with learnable synthetic classes.

    nice -n 15 .venv/bin/python benchmarks/imagenet_like.py /data/imagenet_like --workers 16 --json

Default: 1,000 class folders with synset-like names (``n########``), 732 to 1,300 JPEGs each, 1,281,167 files
in all (ImageNet-1k's train split), 32x32 RGB (ImageNet32's resolution; ``--size 64`` for 64x64). Smaller
versions: ``--classes C --total N`` or ``--scale F`` (F times the files, same 1,000 classes).

Every image is a deterministic function of ``(seed, class, index)``. Each class has a smooth periodic colour
template (a few low-frequency sinusoids); an image is its class template, circularly shifted by up to 1/8 of
the side, mirrored with probability 1/2, colour-jittered (per-channel gain and offset), mixed with a random
other class's template (weight ``--confusion``) and with Gaussian pixel noise (``--noise``). Kernel regression
and KIP can learn the classes, but not perfectly. This is synthetic data: accuracies on it are not ImageNet
results.

Resumable and idempotent: a rerun skips the files already written; each file is written to a temporary name
and renamed into place. The output directory holds a marker file (``.imagenet_like.json``) with the options;
a non-empty directory without it, or with other options, is refused. Nothing is written outside it.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

IMAGENET_CLASSES = 1000
IMAGENET_FILES = 1_281_167
IMAGENET_MAX_PER_CLASS = 1300
IMAGENET_MIN_PER_CLASS = 732
MARKER = ".imagenet_like.json"
TMP_PREFIX = ".tmp-"
FORMAT = 1


@dataclass(frozen=True)
class Options:
    """What the folder is a function of (stored in the marker; a rerun must match it)."""

    classes: int = IMAGENET_CLASSES
    total: int = IMAGENET_FILES
    size: int = 32
    seed: int = 0
    noise: float = 0.12
    confusion: float = 0.45
    quality: int = 90
    format: int = FORMAT


def class_counts(classes: int, total: int, seed: int) -> np.ndarray:
    """Files per class (classes,) int64 summing to ``total``, between ~0.56 and 1 times the largest count.

    With the defaults (1,000 classes, 1,281,167 files) the counts lie in [732, 1300] like ImageNet's: most
    classes have 1,300 files, a seeded few have fewer, one has exactly 732.
    """
    if classes < 1 or total < classes:
        raise ValueError(f"need at least one file per class: --classes {classes}, --total {total}")
    mean_over_max = IMAGENET_FILES / (IMAGENET_CLASSES * IMAGENET_MAX_PER_CLASS)
    high = max(1, int(round(total / classes / mean_over_max)))
    while high * classes < total:
        high += 1
    low = max(1, (high * IMAGENET_MIN_PER_CLASS) // IMAGENET_MAX_PER_CLASS)
    counts = np.full(classes, high, np.int64)
    deficit = int(high * classes - total)
    if deficit > (high - low) * classes:  # cannot reach the total within [low, high]: allow down to 1
        low = 1
    rng = np.random.default_rng([seed, 0x636F756E74])
    first = True
    while deficit > 0:
        c = int(rng.integers(classes))
        room = int(counts[c] - low)
        if room <= 0:
            continue
        take = room if first else int(rng.integers(1, room + 1))
        take = min(take, deficit)
        counts[c] -= take
        deficit -= take
        first = False
    return counts


def synset_names(classes: int, seed: int) -> list[str]:
    """Sorted, distinct synset-like folder names ``n########`` (deterministic from the seed)."""
    rng = np.random.default_rng([seed, 0x73796E])
    ids: set[int] = set()
    while len(ids) < classes:
        ids.update(int(v) for v in rng.integers(1_000_000, 15_000_000, size=classes - len(ids)))
    return [f"n{v:08d}" for v in sorted(ids)]


def template(opts: Options, c: int) -> np.ndarray:
    """Class ``c``'s template, float64 (size, size, 3) in about [0.15, 0.85], periodic on the torus."""
    rng = np.random.default_rng([opts.seed, 0x74656D70, c])
    s = opts.size
    yy, xx = np.meshgrid(np.arange(s) / s, np.arange(s) / s, indexing="ij")
    img = np.zeros((s, s, 3))
    for _ in range(4):
        fy, fx = rng.integers(-3, 4, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        colour = rng.normal(size=3)
        img += np.cos(2 * np.pi * (fy * yy + fx * xx) + phase)[..., None] * colour
    img /= max(np.abs(img).max(), 1e-9)
    return 0.5 + 0.35 * img


def render_class(opts: Options, c: int, n: int, templates: np.ndarray) -> np.ndarray:
    """The ``n`` images of class ``c`` as uint8 (n, size, size, 3); ``templates`` (classes, size, size, 3)."""
    rng = np.random.default_rng([opts.seed, 0x696D67, c])
    s = opts.size
    base = templates[c]
    out = np.empty((n, s, s, 3), np.uint8)
    shift = max(1, s // 8)
    for i in range(n):
        dy, dx = rng.integers(-shift, shift + 1, size=2)
        img = np.roll(base, (int(dy), int(dx)), axis=(0, 1))
        if rng.random() < 0.5:
            img = img[:, ::-1]
        other = int(rng.integers(opts.classes))
        img = (1 - opts.confusion) * img + opts.confusion * templates[other]
        gain = rng.uniform(0.8, 1.2, size=3)
        offset = rng.normal(0, 0.05, size=3)
        img = (img - 0.5) * gain + 0.5 + offset + rng.normal(0, opts.noise, size=img.shape)
        out[i] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return out


def _write_class(job: tuple[str, Options, int, int, str]) -> tuple[int, int, int]:
    """Write class ``c``'s missing files (worker process): (files written, bytes written, files skipped)."""
    from PIL import Image  # noqa: PLC0415

    out, opts, c, n, name = job
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):  # temporaries of a killed run (ours: inside our marked folder)
        if f.startswith(TMP_PREFIX):
            os.remove(os.path.join(folder, f))
    names = [f"{name}_{i}.JPEG" for i in range(n)]
    missing = [i for i, f in enumerate(names) if not os.path.exists(os.path.join(folder, f))]
    if not missing:
        return 0, 0, n
    images = render_class(opts, c, n, _templates(opts))
    written = 0
    for i in missing:
        buf = io.BytesIO()
        Image.fromarray(images[i], "RGB").save(buf, "JPEG", quality=opts.quality)
        data = buf.getvalue()
        final = os.path.join(folder, names[i])
        tmp = os.path.join(folder, f"{TMP_PREFIX}{names[i]}.{os.getpid()}")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, final)
        written += len(data)
    return len(missing), written, n - len(missing)


_TEMPLATES: dict[Options, np.ndarray] = {}


def _templates(opts: Options) -> np.ndarray:
    """All class templates (classes, size, size, 3), built once per worker process."""
    if opts not in _TEMPLATES:
        _TEMPLATES.clear()
        _TEMPLATES[opts] = np.stack([template(opts, k) for k in range(opts.classes)])
    return _TEMPLATES[opts]


def check_output(out: str, opts: Options) -> None:
    """Refuse a non-empty ``out`` that is not this generator's output with the same options (ValueError)."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise ValueError(f"{out} exists and is not a directory; choose another output directory")
    marker = os.path.join(out, MARKER)
    if not os.path.isfile(marker):
        if os.listdir(out):
            raise ValueError(f"{out} is not empty and was not written by imagenet_like.py (no {MARKER}); "
                             "choose an empty or new output directory")
        return
    try:
        with open(marker) as fh:
            theirs = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{marker}: unreadable marker ({exc}); choose a new output directory") from None
    if theirs != asdict(opts):
        diff = sorted(k for k in asdict(opts) if theirs.get(k) != asdict(opts)[k])
        raise ValueError(f"{out} was generated with other options ({', '.join(diff)} differ); use the same options "
                         "to complete it, or a new output directory")


def generate(out: str, opts: Options, workers: int = 1, progress: bool = False) -> dict[str, Any]:
    """Write (or complete) the ImageFolder at ``out``; returns counts, bytes, seconds and files/s."""
    if opts.size not in (32, 64):
        raise ValueError(f"--size must be 32 or 64, got {opts.size}")
    if not 0 <= opts.confusion < 1 or opts.noise < 0:
        raise ValueError("--confusion must be in [0, 1) and --noise >= 0")
    counts = class_counts(opts.classes, opts.total, opts.seed)
    check_output(out, opts)
    names = synset_names(opts.classes, opts.seed)
    os.makedirs(out, exist_ok=True)
    marker = os.path.join(out, MARKER)
    if not os.path.isfile(marker):
        tmp = marker + f".{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(asdict(opts), fh, sort_keys=True)
        os.replace(tmp, marker)
    t0 = time.perf_counter()
    jobs = [(out, opts, c, int(n), names[c]) for c, n in enumerate(counts)]
    written = nbytes = skipped = 0
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            for k, (w, b, s) in enumerate(pool.imap_unordered(_write_class, jobs, chunksize=1)):
                written, nbytes, skipped = written + w, nbytes + b, skipped + s
                if progress and (k + 1) % max(1, len(jobs) // 20) == 0:
                    print(f"{k + 1}/{len(jobs)} classes, {written} files written", file=sys.stderr, flush=True)
    else:
        for job in jobs:
            w, b, s = _write_class(job)
            written, nbytes, skipped = written + w, nbytes + b, skipped + s
    seconds = time.perf_counter() - t0
    disk = sum(os.path.getsize(os.path.join(out, n, f)) for n in names for f in os.listdir(os.path.join(out, n)))
    return {"out": out, "classes": opts.classes, "files": int(counts.sum()), "min_per_class": int(counts.min()),
            "max_per_class": int(counts.max()), "size": opts.size, "files_written": written,
            "files_skipped": skipped, "bytes_written": nbytes, "bytes_on_disk": disk, "seconds": round(seconds, 3),
            "files_per_second": round(written / seconds, 1) if seconds > 0 else None, "workers": workers,
            "options": asdict(opts)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", metavar="DIR", help="output ImageFolder (created; a rerun completes it)")
    p.add_argument("--classes", type=int, default=None, help="class folders (default 1000)")
    p.add_argument("--total", type=int, default=None, help="files in all (default 1,281,167 at 1,000 classes)")
    p.add_argument("--scale", type=float, default=None, help="F: F x 1,281,167 files (rounded), same classes")
    p.add_argument("--size", type=int, default=32, choices=[32, 64], help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=Options.noise, help="std of Gaussian pixel noise (pixels in [0, 1])")
    p.add_argument("--confusion", type=float, default=Options.confusion, help="weight of another class's template")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    p.add_argument("--json", action="store_true", help="print one JSON summary line")
    args = p.parse_args(argv)
    classes = args.classes or IMAGENET_CLASSES
    if args.scale is not None and args.total is not None:
        p.error("give --total or --scale, not both")
    if args.scale is not None and not args.scale > 0:
        p.error(f"--scale must be > 0, got {args.scale}")
    if args.total is not None:
        total = args.total
    elif args.scale is not None:
        total = max(classes, int(round(IMAGENET_FILES * args.scale * classes / IMAGENET_CLASSES)))
    else:
        total = int(round(IMAGENET_FILES * classes / IMAGENET_CLASSES))
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    opts = Options(classes=classes, total=total, size=args.size, seed=args.seed, noise=args.noise,
                   confusion=args.confusion)
    try:
        summary = generate(os.path.abspath(args.out), opts, args.workers, progress=not args.json)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['files']} files in {classes} classes ({summary['min_per_class']}..{summary['max_per_class']} "
              f"per class), {summary['files_written']} written in {summary['seconds']} s "
              f"({summary['files_per_second']} files/s), {summary['bytes_on_disk'] / 2**20:.1f} MiB on disk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
