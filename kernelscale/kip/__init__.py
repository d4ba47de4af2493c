"""KIP (Kernel Inducing Points): learn a small support set whose kernel regression predicts a dataset.

Modules, from the pure maths up: ``step`` (the optax-style ``init``/``update`` step, K_ss tiles and their
gradients), ``augment`` (target translations and flips), ``targets`` (class-balanced target batches from a
dataset store, support initialisation), ``store`` (the distilled store: support, history, checkpoints),
``sharding`` (the target batch over Ray workers, K_ss tile-wise), ``adversarial`` (PGD targets), ``run``
(``distill`` and ``evaluate``: a whole run with checkpoints and resume).
"""

from kernelscale.kip.step import Kip, KipState, make_kip

__all__ = ["Kip", "KipState", "make_kip"]
