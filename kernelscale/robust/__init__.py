"""Robust accuracy of a distilled support set or of a solved full-data model, and robust learning curves
(``run``): the attacks of ``kernelscale.attack`` run over Ray workers on stored data."""

from kernelscale.robust.run import attack_distilled, attack_model, robust_curve

__all__ = ["attack_distilled", "attack_model", "robust_curve"]
