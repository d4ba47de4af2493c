"""``--init gram`` picks (randomized pivoted Cholesky per class over a stored Gram): exactly ``ipc`` distinct rows
of every class, deterministic in the seed, also when a class's kernel has lower rank than ``ipc``."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kernelscale.gram.store import open_gram
from kernelscale.kip.targets import init_gram, label_solve
from krr_helpers import write_gram


def fake_data(labels: np.ndarray, num_classes: int) -> SimpleNamespace:
    """What init_gram reads of a DatasetStore."""
    return SimpleNamespace(labels=labels, num_classes=num_classes, class_names=[str(c) for c in range(num_classes)],
                           path="data.zarr", one_hot=lambda: np.eye(num_classes, dtype=np.float32)[labels])


@pytest.mark.parametrize("rank", [3, None])  # None: full rank; 3: every class exhausted after 3 picks
def test_init_gram_picks_ipc_distinct_rows_per_class(tmp_path, rank):
    rng = np.random.default_rng(0)
    n, c, ipc = 45, 3, 5
    f = rng.standard_normal((n, rank or n))
    labels = rng.permutation(np.repeat(np.arange(c), n // c))
    path = str(tmp_path / "g.zarr")
    write_gram(path, f @ f.T, tile=8)
    data, gram = fake_data(labels, c), open_gram(path)
    rows = init_gram(data, gram, ipc, seed=1)
    assert len(rows) == c * ipc and len(np.unique(rows)) == c * ipc
    for k in range(c):  # grouped by class, sorted within it
        part = rows[k * ipc : (k + 1) * ipc]
        assert (labels[part] == k).all() and (np.diff(part) > 0).all()
    assert np.array_equal(init_gram(data, gram, ipc, seed=1), rows)


def test_label_solve_reads_the_support_columns(tmp_path):
    rng = np.random.default_rng(3)
    n, c = 30, 3
    f = rng.standard_normal((n, n))
    k = f @ f.T
    labels = np.arange(n) % c
    path = str(tmp_path / "g.zarr")
    write_gram(path, k, tile=8)
    support = np.array([0, 4, 8, 13, 22, 29])
    out = label_solve(fake_data(labels, c), open_gram(path), support, reg=1e-3)
    assert out["labels"].shape == (len(support), c) and out["train_pred"].shape == (n, c)
    lam = 1e-3 * np.trace(k[np.ix_(support, support)]) / len(support)
    w = np.linalg.solve(k[np.ix_(support, support)] + lam * np.eye(len(support)), out["labels"].astype(np.float64))
    np.testing.assert_allclose(out["train_pred"], k[:, support] @ w, rtol=1e-10)
