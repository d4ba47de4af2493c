"""Score a solved model or a distilled support set on TEST: accuracy and mse.

STORE is a model from `kernelscale solve` or a support set from `kernelscale distill`. A model predicts
K(test, train) @ alpha, streamed tile by tile from --cross CROSS.zarr, the cross Gram
`kernelscale gram TEST.zarr --against DATA.zarr` (its fingerprints must match TEST and the model's data).
A support set predicts by kernel regression from its own images (no cross Gram); TEST must share DATA's input
shape and preprocessing (ingest it with --stats-from DATA.zarr or as DATA's --val-out split).
mse is the mean over rows and classes of (prediction - (one-hot - 1/C))^2.
With --attack linf:EPS|l2:EPS also reports robust_accuracy under PGD in pixel space (pixels in [0, 1], mapped
through TEST's preprocessing); for a support also noise_accuracy under random noise of the same norm, for a
model with gradients against all its training rows (read from the DATA path its Gram recorded, or --data).
`kernelscale eval` is the same command under its earlier name.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any

from kernelscale import config, storage
from kernelscale.cli.attack_flags import add_attack_flags, attack_from_args, attack_kwargs
from kernelscale.errors import InputError
from kernelscale.kip.run import evaluate as evaluate_support
from kernelscale.krr import evaluate as evaluate_model
from kernelscale.robust.run import attack_distilled, attack_model


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """Settings of ``kernelscale evaluate`` (the ``--attack`` group is :mod:`kernelscale.cli.attack_flags`)."""

    store: str = config.option(
        "store", metavar="STORE.zarr",
        help="a model (`kernelscale solve`) or a distilled support set (`kernelscale distill`)")
    test: str = config.option("--test", metavar="TEST.zarr", help="dataset store to predict")
    cross: str | None = config.option("--cross", None, metavar="CROSS.zarr",
                                      help="models only: the cross Gram K(test, train)")
    batch: int = config.option("--batch", 2048, type=int, metavar="N", help="support sets: test rows per kernel call")
    data: str | None = config.option("--data", None, metavar="DATA.zarr",
                                     help="models, for --attack: the model's training data (default: the data path "
                                          "its Gram recorded)")
    chunk: int = config.option("--chunk", 4096, type=int, metavar="N",
                               help="models, for --attack: training rows per kernel block in attack gradients "
                                    "(bounds memory)")
    allow_code: bool = config.option("--allow-code", False, action="store_true",
                                     help="a store of user code: import that code (checked against its recorded "
                                          "source hash)")


#: The fields whose flags ``--help`` lists before the attack group (the rest come after it).
BEFORE_ATTACK = ("store", "test", "cross", "batch")


def register(p: argparse.ArgumentParser) -> None:
    config.add_arguments(p, EvaluateConfig, BEFORE_ATTACK)
    add_attack_flags(p)
    config.add_arguments(p, EvaluateConfig, [f.name for f in fields(EvaluateConfig) if f.name not in BEFORE_ATTACK])


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = config.from_namespace(EvaluateConfig, args)
    attack = attack_from_args(args)  # parsed before any compute
    kind = storage.store_kind(cfg.store)
    if kind == "model":
        if not cfg.cross:
            raise InputError(f"{cfg.store} is a model: give --cross CROSS.zarr, the cross Gram of TEST against the "
                             f"model's data (`kernelscale gram {cfg.test} --against DATA.zarr --out CROSS.zarr`)")
        summary = evaluate_model(cfg.store, cfg.cross, cfg.test)
        if attack is not None:
            summary.update(attack_model(cfg.store, cfg.test, attack, data=cfg.data, chunk=cfg.chunk,
                                        allow_code=cfg.allow_code, **attack_kwargs(args)))
    elif kind == "distilled":
        if cfg.cross:
            raise InputError(f"{cfg.store} is a distilled support set: it predicts from its own images, so it takes "
                             "no --cross; leave it out")
        summary = evaluate_support(cfg.store, cfg.test, batch=cfg.batch, allow_code=cfg.allow_code)
        if attack is not None:
            summary.update(attack_distilled(cfg.store, cfg.test, attack, allow_code=cfg.allow_code,
                                            **attack_kwargs(args)))
    else:
        raise InputError(_not_scorable(cfg.store, kind))
    return {"store_kind": kind} | summary


def _not_scorable(path: str, kind: str | None) -> str:
    """What ``path`` is instead of a model or a support set, and the command that makes one."""
    make = ("a model (`kernelscale solve GRAM.zarr --data DATA.zarr --out MODEL.zarr`) or a distilled support set "
            "(`kernelscale distill DATA.zarr --out DISTILLED.zarr`)")
    if kind == "gram":
        return f"{path} is a Gram store; evaluate scores {make}"
    if kind == "dataset":
        return f"{path} is a dataset store (pass it as --test); evaluate scores {make}"
    if not storage.exists(path):
        return f"{path} does not exist; evaluate scores {make}"
    return f"{path} is not a kernelscale store; evaluate scores {make}"
