"""Adversarial attacks (PGD, random noise) on kernel-regression predictors, in pixel space (``kernel_pgd``)."""

from kernelscale.attack.kernel_pgd import Attack, KernelPredictor, attack_rows, pgd, random_noise, robust_accuracy

__all__ = ["Attack", "KernelPredictor", "attack_rows", "pgd", "random_noise", "robust_accuracy"]
