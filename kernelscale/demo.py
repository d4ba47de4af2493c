"""The main job on the embedded default: ingest mnist5k with a validation split, then the pipeline stages.

Each stage is skipped when its output already exists, so rerunning resumes rather than recomputes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from . import storage
from .data import ingest, open_dataset

log = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    out: str = "demo_out"
    limit: int = 5000
    progress: bool = True


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    t0 = time.perf_counter()
    os.makedirs(opts.out, exist_ok=True)
    train, val = os.path.join(opts.out, "train.zarr"), os.path.join(opts.out, "val.zarr")
    report: dict[str, Any] = {"out": os.path.abspath(opts.out)}
    if not (storage.exists(train) and storage.exists(val)):
        report["ingest"] = ingest("mnist5k", train, val_fraction=0.2, val_out=val, limit=opts.limit,
                                  preprocess="standardize", overwrite=True, progress=opts.progress)
    ds = open_dataset(train)
    report["dataset"] = ds.summary()
    report["seconds"] = round(time.perf_counter() - t0, 2)
    with open(os.path.join(opts.out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2, default=str)
    print(f"report: {os.path.abspath(os.path.join(opts.out, 'report.json'))}")
    return report
