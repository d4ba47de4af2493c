"""KIP target augmentation: the spec grammar, the pixel maths, and determinism across steps and shards."""

from __future__ import annotations

import numpy as np
import pytest

from kernelscale.errors import InputError
from kernelscale.kip.augment import TargetAugment


def test_auto_translates_images_only():
    assert TargetAugment.parse("auto", (32, 32, 3)) == TargetAugment(shift=2)
    assert TargetAugment.parse("auto", (28, 28, 1)) == TargetAugment(shift=2)
    assert TargetAugment.parse("auto", (224, 224, 3)) == TargetAugment(shift=14)
    assert not TargetAugment.parse("auto", (784,)).active  # flat rows are not images
    assert TargetAugment.parse("auto", (8, 8, 3)) == TargetAugment(shift=1)
    assert not TargetAugment.parse("auto", (4, 4, 3)).active  # too small to translate
    assert TargetAugment.parse("none", (32, 32, 3)) == TargetAugment()
    assert TargetAugment.parse("shift=3,flip", (32, 32, 3)) == TargetAugment(shift=3, flip=True)
    assert TargetAugment.parse("flip", (32, 32, 3)).describe() == "flip"


@pytest.mark.parametrize("spec, shape, words", [
    ("shift=two", (32, 32, 3), "cannot read"),
    ("rotate", (32, 32, 3), "cannot read"),
    ("shift=2", (784,), "not images"),
    ("shift=4", (8, 8, 1), "at most shift=3"),
])
def test_bad_specs_say_what_to_do(spec, shape, words):
    with pytest.raises(InputError, match=words):
        TargetAugment.parse(spec, shape)


def test_shift_and_flip_move_pixels_as_drawn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 10, 12, 2)).astype(np.float32)
    original = x.copy()
    aug = TargetAugment(shift=2, flip=True)
    # centre offset (dy = dx = shift) and no flip is the identity
    params = np.array([[2, 2, 0]] * 6)
    np.testing.assert_array_equal(aug.apply(x, params), x)
    # dy = 0 takes the window starting 2 rows above the image: output row r is input row r - 2 (reflected at the top)
    params = np.array([[0, 2, 0], [4, 2, 0], [2, 0, 0], [2, 4, 1], [2, 2, 1], [0, 0, 0]])
    out = aug.apply(x, params)
    np.testing.assert_array_equal(out[0, 2:], x[0, :-2])
    np.testing.assert_array_equal(out[0, :2], x[0, [2, 1]])  # reflect padding
    np.testing.assert_array_equal(out[1, :-2], x[1, 2:])
    np.testing.assert_array_equal(out[2, :, 2:], x[2, :, :-2])
    np.testing.assert_array_equal(out[3, :, ::-1][:, :-2], x[3, :, 2:])  # shifted left, then mirrored
    np.testing.assert_array_equal(out[4], x[4, :, ::-1])
    np.testing.assert_array_equal(out[5, 2:, 2:], x[5, :-2, :-2])
    assert out.dtype == x.dtype and out.shape == x.shape
    np.testing.assert_array_equal(x, original)  # the input is not modified


def test_draw_is_a_function_of_seed_and_step():
    aug = TargetAugment(shift=2, flip=True)
    a, b = aug.draw(500, 7, 3), aug.draw(500, 7, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, aug.draw(500, 7, 4)) and not np.array_equal(a, aug.draw(500, 8, 3))
    assert a[:, :2].min() == 0 and a[:, :2].max() == 4 and set(np.unique(a[:, 2])) == {0, 1}
    assert not TargetAugment(shift=2).draw(100, 0, 0)[:, 2].any()


def test_sampler_shards_see_the_rows_of_the_whole_augmented_batch(mnist_small):
    from kernelscale.data import open_dataset
    from kernelscale.kip.targets import TargetSampler

    data = open_dataset(mnist_small["train"])
    aug = TargetAugment(shift=2, flip=True)
    sampler = TargetSampler(data, 60, seed=3, augment=aug)
    x, y = sampler.batch(5)
    parts = [sampler.batch(5, part=p, parts=3) for p in range(3)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)
    plain, _ = TargetSampler(data, 60, seed=3).batch(5)
    assert x.shape == plain.shape and not np.array_equal(x, plain)
    # the same rows, grouped by translation, each translated/flipped as drawn
    params = aug.draw(60, 3, 5)
    order = aug.grouping(params)
    np.testing.assert_array_equal(aug.apply(plain[order], params[order]), x)
    np.testing.assert_array_equal(np.sort(y.argmax(1)), np.sort(TargetSampler(data, 60, seed=3).batch(5)[1].argmax(1)))


@pytest.mark.parametrize("shift", [1, 2, 3])
def test_pad_is_numpys_reflect_pad(shift):
    x = np.random.default_rng(shift).normal(size=(3, 9, 7, 2)).astype(np.float32)
    expect = np.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(TargetAugment(shift=shift).pad(x), expect)


def test_in_memory_and_row_read_samplers_agree(mnist_small):
    """The padded in-memory path and the read-by-rows path (DATA larger than the memory limit) give one batch."""
    from kernelscale.data import open_dataset
    from kernelscale.kip.targets import TargetSampler

    data = open_dataset(mnist_small["train"])
    aug = TargetAugment(shift=2, flip=True)
    held, streamed = TargetSampler(data, 50, 1, augment=aug), TargetSampler(data, 50, 1, memory_limit=0, augment=aug)
    assert held.x_in_memory is not None and streamed.x_in_memory is None
    for step in (0, 9):
        for a, b in zip(held.batch(step, 1, 2), streamed.batch(step, 1, 2)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(held.read(np.arange(5))[0], data.rows(0, 5))  # plain reads stay unpadded
