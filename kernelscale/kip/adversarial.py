"""Adversarial KIP: the KIP target batch replaced (or partly replaced) by PGD examples against the support.

Before each KIP step, :class:`AdversarialTargets` (a :data:`kernelscale.kip.step.TargetTransform`) maps the
preprocessed target rows back to pixels (the dataset's affine map, inverted exactly), runs PGD in pixel space
against the current support predictor ``K(x, X_s) (K_ss + lam I)^-1 y_s`` and maps the result forward again;
the labels stay those of the clean rows. The support therefore learns to predict the labels of perturbed
targets (Tsilivis, Su & Kempe 2022, "Can we achieve robustness from data alone?"). The adversarial examples
are treated as constants of the KIP loss (Danskin), i.e. no gradient flows through the attack.

Determinism: each row's PGD random start (and, with ``mix < 1``, whether the row is replaced) derives from the
step's KIP PRNG key (``KipState.key``, checkpointed) folded with a hash of the row, so a resumed run is
bitwise identical and a sharded step sees exactly the per-row randomness of the unsharded one.
The transform is a plain picklable object, so it travels to Ray shard workers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kernelscale.data import AffineMap
from kernelscale.errors import InputError
from kernelscale.kernels import KernelSpec
from kernelscale.attack.kernel_pgd import Attack, pgd_traceable, row_keys
from kernelscale.kip.sharding import pair_kernel
from kernelscale.kip.step import krr_weights

log = logging.getLogger(__name__)

START_TAG = 0x61647631  # folded into the step key for PGD random starts
MIX_TAG = 0x6D697831  # folded into the step key for the replaced-row draw


@dataclass(frozen=True, eq=False)
class AdversarialTargets:
    """``f(state, x_t, y_t) -> (x_adv, y_t)``: PGD targets against the current support (see module doc).

    attack: PGD settings (restarts are ignored: one random start per step); spec: kernel spec JSON;
    reg: KIP ridge (times trace(K_ss)/n_s); mix: fraction of target rows replaced (1 = all);
    affine: the dataset's preprocessing (pixels -> inputs).
    """

    attack: Attack
    spec: str
    reg: float
    mix: float
    affine: AffineMap

    @classmethod
    def build(cls, text: str, steps: int, mix: float, spec: KernelSpec, reg: float, affine: AffineMap,
              step_size: float | None = None) -> "AdversarialTargets":
        """From ``--adversarial linf:EPS|l2:EPS --pgd-steps P --adv-mix F`` (checked here, before any compute)."""
        attack = Attack.parse(text, steps=steps, step_size=step_size)
        if not 0.0 < mix <= 1.0:
            raise InputError(f"--adv-mix must be in (0, 1], got {mix}")
        return cls(attack, spec.canonical(), float(reg), float(mix), affine)

    def config(self) -> dict[str, Any]:
        """The settings a resumed run must repeat (stored in the distilled store's config)."""
        return {"attack": self.attack.to_json(), "mix": self.mix}

    def describe(self) -> str:
        return f"PGD {self.attack.describe()}, mix {self.mix:g}"

    # -- traceable pieces -------------------------------------------------------------------------------
    def to_pixels(self, inputs: Any) -> Any:
        """Model inputs back to pixels (:meth:`AffineMap.invert`, traceable), clipped to [0, 1]."""
        import jax.numpy as jnp  # noqa: PLC0415

        return jnp.clip(self.affine.invert(inputs, traceable=True), 0.0, 1.0)

    def __call__(self, state: Any, x_t: Any, y_t: Any) -> tuple[Any, Any]:
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415

        kernel = pair_kernel(KernelSpec.from_json(self.spec))
        x_s, y_s = jax.lax.stop_gradient(state.x), jax.lax.stop_gradient(state.y)
        weights = krr_weights(kernel(x_s, x_s), y_s, self.reg)

        def predict(x: Any) -> Any:
            return kernel(x, x_s) @ weights

        keys = row_keys(jax.random.fold_in(state.key, START_TAG), x_t)
        adv = pgd_traceable(predict, self.affine.apply, self.to_pixels(x_t), jnp.argmax(y_t, axis=1),
                            self.attack, keys)
        x_adv = self.affine.apply(adv).astype(x_t.dtype)
        if self.mix < 1.0:
            mix_keys = row_keys(jax.random.fold_in(state.key, MIX_TAG), x_t)
            pick = jax.vmap(lambda k: jax.random.uniform(k))(mix_keys) < self.mix
            x_adv = jnp.where(pick.reshape((-1,) + (1,) * (x_t.ndim - 1)), x_adv, x_t)
        return jax.lax.stop_gradient(x_adv), y_t
