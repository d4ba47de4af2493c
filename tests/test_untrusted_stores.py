"""Stores are untrusted input (issue 16): every row of the issue's table, and each class of bad input, as a test.

Each refusal asserts the exit code, the one-line message, and that nothing outside the store changed (a
snapshot of every file under the test's folder, taken before, equals the one after). The user-code module
used here writes a marker file when it is imported, so "not imported" is checked directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from kernelscale import compute_gram, kernels, parse_arch
from kernelscale.cli import main
from kernelscale.data import open_dataset
from kernelscale.kip.store import create_distilled
from kernelscale.errors import InputError, KernelscaleError, StoreError
from kernelscale.runtime import check_remote_auth

from fault_helpers import Tmpfs, npz_store, synthetic_images
from krr_helpers import pairwise_gram, small_split_with_grams, write_gram

ARCH = "fc:depth=2"
ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *argv: str) -> tuple[int, dict, str]:
    code = main([*argv, "--json", "--no-progress"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]), captured.err


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file (and the target of every link) under ``root``, keyed by relative path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_refused(code: int, summary: dict, err: str, *needles: str) -> None:
    """Exit 2, a one-line message holding every needle, no traceback, no ANSI codes."""
    assert code == 2, summary
    message = summary["error"]
    assert "\n" not in message and "\x1b[" not in message and "Traceback" not in err
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.fixture()
def small(tmp_path) -> dict:
    """40 rows of 4x4x1 in 3 classes, their Gram (fc depth 2) and a 12-row test split with its cross Gram."""
    return small_split_with_grams(tmp_path, ARCH)


# -- 1. user code in a stored spec ----------------------------------------------------------------------------

EVIL_SOURCE = (
    "import pathlib\n"
    "pathlib.Path({marker!r}).write_text('imported')\n"
    "import neural_tangents.stax as stax\n"
    "def net():\n"
    "    return stax.serial(stax.Flatten(), stax.Dense(8), stax.Relu(), stax.Dense(1))\n"
)


@pytest.fixture()
def evil(tmp_path, monkeypatch) -> dict:
    """A module ``evilmod_<n>`` on sys.path that writes ``marker`` when imported, and its code spec."""
    folder = tmp_path / "usercode"
    folder.mkdir()
    name = f"evilmod_{abs(hash(str(tmp_path))) % 10**8}"
    marker = tmp_path / "IMPORTED"
    source = EVIL_SOURCE.format(marker=str(marker))
    (folder / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    spec = {"arch": "code", "params": {"target": f"{name}:net", "source_sha256": digest}, "kernel": "ntk"}
    yield {"module": name, "file": folder / f"{name}.py", "marker": marker, "spec": spec}
    sys.modules.pop(name, None)


def _code_stores(small: dict, evil: dict) -> dict:
    """A distilled store, a Gram with a missing tile, and a solved model + cross Gram, all of the evil spec."""
    root, tr, te = small["root"], open_dataset(small["train"]), open_dataset(small["test"])
    xtr, xte = tr.rows(0, tr.n), te.rows(0, te.n)
    k, kx = pairwise_gram(ARCH, xtr), pairwise_gram(ARCH, xte, xtr)
    gram, cross = str(root / "code_gram.zarr"), str(root / "code_cross.zarr")
    store = write_gram(gram, k, tile=16, data_fingerprint=tr.fingerprint, spec=evil["spec"])
    store.group.attrs["data_path"] = os.path.abspath(small["train"])
    write_gram(cross, kx, tile=16, data_fingerprint=te.fingerprint, against_fingerprint=tr.fingerprint,
               spec=evil["spec"])
    model = str(root / "code_model.zarr")
    assert main(["solve", gram, "--data", small["train"], "--reg", "1e-3", "--solver", "cholesky", "--out", model,
                 "--no-progress"]) == 0
    os.remove(Path(gram) / "gram" / "c" / "0" / "2")  # a tile for verify --repair to recompute
    distilled = str(root / "code_distilled.zarr")
    ds = create_distilled(distilled, n_support=6, input_shape=tr.input_shape, num_classes=3,
                          support_rows=np.arange(6), attrs={"spec": evil["spec"], "reg": 1e-6,
                          "input_shape": list(tr.input_shape), "num_classes": 3,
                          "preprocess_digest": tr.affine.digest(), "config": {}})
    ds.write_support(xtr[:6], np.eye(3, dtype=np.float32)[np.arange(6) % 3], {}, 0)
    return {"gram": gram, "cross": cross, "model": model, "distilled": distilled}


COMMANDS = {
    "evaluate": lambda s, c: ["evaluate", c["distilled"], "--test", s["test"]],
    "verify --repair": lambda s, c: ["verify", c["gram"], "--repair"],
    "eval --attack": lambda s, c: ["eval", c["model"], "--cross", c["cross"], "--test", s["test"], "--attack",
                                   "linf:0.1", "--pgd-steps", "1"],
    "evaluate --attack": lambda s, c: ["evaluate", c["distilled"], "--test", s["test"], "--attack", "linf:0.1",
                                       "--pgd-steps", "1"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_stored_user_code_is_refused_without_allow_code_and_never_imported(small, evil, capsys, command):
    stores = _code_stores(small, evil)
    capsys.readouterr()
    before = snapshot(small["root"])
    code, summary, err = cli(capsys, *COMMANDS[command](small, stores))
    assert_refused(code, summary, err, "--allow-code", f"{evil['module']}:net")
    assert not evil["marker"].exists(), "the module was imported"
    assert evil["module"] not in sys.modules
    assert snapshot(small["root"]) == before


def test_stored_user_code_whose_source_changed_is_refused_with_allow_code(small, evil, capsys):
    stores = _code_stores(small, evil)
    evil["file"].write_text(evil["file"].read_text() + "# edited after the store was made\n")
    capsys.readouterr()
    before = snapshot(small["root"])
    code, summary, err = cli(capsys, "evaluate", stores["distilled"], "--test", small["test"], "--allow-code")
    assert_refused(code, summary, err, "has changed since the store was made", "source sha256")
    assert not evil["marker"].exists() and snapshot(small["root"]) == before


def test_stored_user_code_with_its_recorded_hash_runs_only_with_allow_code(small, evil, capsys):
    stores = _code_stores(small, evil)
    with pytest.raises(InputError, match="allow_code=True"):  # the gate in kernels.network itself (API words)
        kernels.kernel_fn(kernels.KernelSpec.from_json(evil["spec"]))
    assert not evil["marker"].exists()
    code, summary, _ = cli(capsys, "evaluate", stores["distilled"], "--test", small["test"], "--allow-code")
    assert code == 0 and 0.0 <= summary["accuracy"] <= 1.0, summary
    assert evil["marker"].exists()


def test_gram_and_verify_repair_of_user_code_run_with_allow_code(small, evil, capsys, ray_local):
    out = str(small["root"] / "code.zarr")
    target = f"{evil['module']}:net"
    code, summary, _ = cli(capsys, "gram", small["train"], "--arch", target, "--allow-code", "--out", out,
                           "--tile", "16")
    assert code == 0 and summary["tiles_computed"] == 6, summary
    tile = Path(out) / "gram" / "c" / "1" / "2"
    good = tile.read_bytes()
    tile.unlink()
    code, summary, _ = cli(capsys, "verify", out, "--repair", "--allow-code")
    assert code == 0 and summary["repaired"] == 1 and summary["ok"], summary
    assert tile.read_bytes() == good


# -- 2. --overwrite deletes only our own stores; outputs never overlap inputs ---------------------------------


def _user_folder(root: Path, name: str) -> Path:
    folder = root / name
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "sub" / "data.csv").write_text("1,2,3")
    return folder


def _npz(root: Path) -> str:
    path = root / "src.npz"
    np.savez(path, images=synthetic_images(30, seed=1), labels=np.arange(30) % 3)
    return str(path)


@pytest.mark.parametrize("case", ["out_user_folder", "out_user_file", "val_out_user_folder", "out_gram_store"])
def test_ingest_overwrite_refuses_anything_but_a_dataset_store(tmp_path, capsys, case):
    src = _npz(tmp_path)
    folder = _user_folder(tmp_path, "mine")
    (tmp_path / "notes.txt").write_text("keep me")
    if case == "out_gram_store":
        write_gram(str(tmp_path / "g.zarr"), np.eye(4), tile=4)
    target = {"out_user_folder": str(folder), "out_user_file": str(tmp_path / "notes.txt"),
              "val_out_user_folder": str(tmp_path / "new.zarr"), "out_gram_store": str(tmp_path / "g.zarr")}[case]
    extra = ["--val-fraction", "0.2", "--val-out", str(folder)] if case == "val_out_user_folder" else []
    before = snapshot(tmp_path)
    code, summary, err = cli(capsys, "ingest", src, target, "--overwrite", *extra)
    assert_refused(code, summary, err, "kernelscale replaces only its own dataset stores")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["out_is_src", "out_inside_src", "out_contains_src", "val_out_is_src"])
def test_ingest_refuses_an_output_equal_to_inside_or_containing_its_source(tmp_path, capsys, case):
    from PIL import Image

    src = tmp_path / "images"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(src / c / f"{i}.png")
    out = {"out_is_src": src, "out_inside_src": src / "a" / "x.zarr", "out_contains_src": tmp_path,
           "val_out_is_src": tmp_path / "train.zarr"}[case]
    extra = ["--val-fraction", "0.3", "--val-out", str(src)] if case == "val_out_is_src" else []
    before = snapshot(tmp_path)
    code, summary, err = cli(capsys, "ingest", str(src), str(out), "--overwrite", *extra)
    assert code == 2 and "\n" not in summary["error"]
    assert any(word in summary["error"] for word in ("same path as", "inside", "contains", "replaces only")), summary
    assert snapshot(tmp_path) == before


def test_ingest_overwrite_replaces_a_dataset_store_only_after_the_new_one_is_complete(tmp_path, capsys):
    src = _npz(tmp_path)
    out = str(tmp_path / "d.zarr")
    assert main(["ingest", src, out, "--no-progress"]) == 0
    old = open_dataset(out).fingerprint
    code, summary, _ = cli(capsys, "ingest", src, out, "--overwrite", "--preprocess", "standardize")
    assert code == 0 and open_dataset(out).fingerprint == summary["fingerprint"] != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.zarr", "src.npz"]  # no partial store left


def test_demo_does_not_replace_a_users_train_zarr(tmp_path, capsys):
    out = tmp_path / "report"
    folder = _user_folder(out, "train.zarr")
    before = snapshot(tmp_path)
    code, summary, err = cli(capsys, "demo", "--out", str(out))
    assert_refused(code, summary, err, str(folder), "kernelscale replaces only its own dataset stores")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["gram_out_is_data", "gram_out_inside_data", "solve_out_is_gram",
                                  "solve_checkpoint_inside_gram", "distill_out_inside_data"])
def test_outputs_may_not_be_equal_to_inside_or_containing_inputs(small, capsys, case):
    s = small
    argv = {
        "gram_out_is_data": ["gram", s["train"], "--arch", ARCH, "--out", s["train"]],
        "gram_out_inside_data": ["gram", s["train"], "--arch", ARCH, "--out", s["train"] + "/g.zarr"],
        "solve_out_is_gram": ["solve", s["gram"], "--data", s["train"], "--reg", "1e-3", "--out", s["gram"]],
        "solve_checkpoint_inside_gram": ["solve", s["gram"], "--data", s["train"], "--reg", "1e-3", "--out",
                                         str(s["root"] / "m.zarr"), "--checkpoint", s["gram"] + "/ck.npz"],
        "distill_out_inside_data": ["distill", s["train"], "--arch", ARCH, "--steps", "1", "--out",
                                    s["train"] + "/d.zarr"],
    }[case]
    before = snapshot(s["root"])
    code, summary, err = cli(capsys, *argv)
    assert_refused(code, summary, err)
    assert any(w in summary["error"] for w in ("same path as", "lies inside", "contains")), summary
    assert snapshot(s["root"]) == before


# -- 3. allow-listed layouts ----------------------------------------------------------------------------------


def _edit_meta(store: str, array: str, edit) -> None:
    path = Path(store) / array / "zarr.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _edit_attrs(store: str, edit) -> None:
    path = Path(store) / "zarr.json"
    meta = json.loads(path.read_text())
    edit(meta["attributes"])
    path.write_text(json.dumps(meta))


TAMPER = {
    # store, edit, message fragments
    "gram_value_changing_codec": ("gram", "gram", lambda m: m["codecs"].insert(1, {
        "name": "numcodecs.fixedscaleoffset", "configuration": {"offset": 0, "scale": 1000, "dtype": "<f8"}}),
        ["array 'gram'", "'numcodecs.fixedscaleoffset'", "can change values"]),
    "gram_unknown_codec": ("gram", "gram", lambda m: m["codecs"].append({"name": "mystery"}),
                           ["array 'gram'", "'mystery'"]),
    "gram_crc32c_removed": ("gram", "gram", lambda m: m.__setitem__("codecs", m["codecs"][:1]),
                            ["array 'gram'", "crc32c"]),
    "gram_big_endian": ("gram", "gram", lambda m: m["codecs"][0].__setitem__("configuration", {"endian": "big"}),
                        ["array 'gram'", "little-endian"]),
    "gram_dtype_changed": ("gram", "gram", lambda m: m.__setitem__("data_type", "float32"),
                           ["array 'gram'", "data type float32, expected float64"]),
    "gram_chunks_changed": ("gram", "gram", lambda m: m["chunk_grid"]["configuration"].__setitem__(
        "chunk_shape", [8, 8]), ["array 'gram'", "chunks (8, 8), expected (16, 16)"]),
    "gram_fill_changed": ("gram", "gram", lambda m: m.__setitem__("fill_value", 0.0),
                          ["array 'gram'", "fill value 0.0, expected NaN"]),
    "labels_retyped_float64": ("train", "labels", lambda m: m.__setitem__("data_type", "float64"),
                               ["array 'labels'", "data type float64, expected int64"]),
    "x_retyped_int32": ("train", "x", lambda m: m.__setitem__("data_type", "int32"),
                        ["array 'x'", "data type int32, expected float32"]),
    "x_reshaped": ("train", "x", lambda m: (m.__setitem__("shape", [40, 16, 1, 1]),
                                            m["chunk_grid"]["configuration"].__setitem__("chunk_shape", [40, 16, 1, 1])),
                   ["array 'x'", "shape (40, 16, 1, 1), expected (40, 4, 4, 1)"]),
    "x_pickle_codec": ("train", "x", lambda m: m["codecs"].append({"name": "pickle"}), ["can run code"]),
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_solve_refuses_a_tampered_array_layout_before_reading_it(small, capsys, case):
    which, array, edit, needles = TAMPER[case]
    _edit_meta(small[which], array, edit)
    out = small["root"] / "model.zarr"
    before = snapshot(small["root"])
    code, summary, err = cli(capsys, "solve", small["gram"], "--data", small["train"], "--reg", "1e-3",
                             "--solver", "cholesky", "--out", str(out))
    assert_refused(code, summary, err, small[which], *needles)
    assert not out.exists() and snapshot(small["root"]) == before


ATTR_TAMPER = {
    "gram_spec_edited": ("gram", lambda a: a["spec"]["params"].__setitem__("depth", 3), ["'fingerprint'"]),
    "gram_tile_not_int": ("gram", lambda a: a.__setitem__("tile", "16"), ["'tile'", "an integer >= 1"]),
    "gram_shape_mismatch": ("gram", lambda a: a.__setitem__("shape", [41, 41]),
                            ["array 'gram' has shape (40, 40), expected (41, 41)"]),
    "dataset_no_classes": ("train", lambda a: a.__setitem__("class_names", []), ["'class_names'"]),
    "dataset_input_shape": ("train", lambda a: a.__setitem__("input_shape", [2, 8, 1]),
                            ["array 'x'", "expected (40, 2, 8, 1)"]),
}


@pytest.mark.parametrize("case", list(ATTR_TAMPER))
def test_solve_refuses_tampered_attributes(small, capsys, case):
    which, edit, needles = ATTR_TAMPER[case]
    _edit_attrs(small[which], edit)
    before = snapshot(small["root"])
    code, summary, err = cli(capsys, "solve", small["gram"], "--data", small["train"], "--reg", "1e-3",
                             "--solver", "cholesky", "--out", str(small["root"] / "model.zarr"))
    assert_refused(code, summary, err, small[which], *needles)
    assert snapshot(small["root"]) == before


def _edit_rows_keeping_fingerprint(store: str) -> None:
    x = zarr.open_group(store, mode="r+")["x"]
    block = np.asarray(x[0:1])
    block.reshape(-1)[0] += 0.5
    x[0:1] = block


def test_dataset_rows_edited_with_the_fingerprint_kept_are_refused_by_solve_eval_gram_and_verify(small, capsys,
                                                                                                 ray_local):
    _edit_rows_keeping_fingerprint(small["train"])
    _edit_rows_keeping_fingerprint(small["test"])
    before = snapshot(small["root"])
    code, summary, err = cli(capsys, "solve", small["gram"], "--data", small["train"], "--reg", "1e-3", "--solver",
                             "cholesky", "--out", str(small["root"] / "m.zarr"))
    assert_refused(code, summary, err, small["train"], "differ from what was ingested")
    code, summary, err = cli(capsys, "gram", small["train"], "--arch", ARCH, "--out", str(small["root"] / "g2.zarr"))
    assert_refused(code, summary, err, small["train"], "differ from what was ingested")
    assert snapshot(small["root"]) == before
    store = zarr.open_group(small["gram"], mode="r+")
    store.attrs["data_path"] = os.path.abspath(small["train"])
    code, summary, _ = cli(capsys, "verify", small["gram"])
    assert code == 2 and not summary["ok"]
    assert summary["data"][0]["ok"] is False and "differ from what was ingested" in summary["data"][0]["problem"]


def test_a_resumed_gram_tile_cannot_be_decoded_through_a_value_changing_codec(small, capsys, ray_local):
    """The issue's 892x case: a resumed Gram whose codec rescales values. Refused on open, nothing computed."""
    out = str(small["root"] / "g.zarr")
    assert main(["gram", small["train"], "--arch", ARCH, "--out", out, "--tile", "16", "--no-progress"]) == 0
    os.remove(Path(out) / "gram" / "c" / "0" / "1")
    _edit_meta(out, "gram", lambda m: m["codecs"].insert(1, {"name": "numcodecs.fixedscaleoffset",
                                                             "configuration": {"offset": 0, "scale": 892}}))
    before = snapshot(small["root"])
    for argv in (["gram", small["train"], "--arch", ARCH, "--out", out], ["verify", out], ["status", out]):
        code, summary, err = cli(capsys, *argv)
        assert_refused(code, summary, err, "can change values")
    assert snapshot(small["root"]) == before


# -- 4. symbolic links leaving a store ------------------------------------------------------------------------


def test_symlinked_chunk_folder_is_refused_by_verify_repair_gram_and_overwrite(small, capsys, ray_local):
    user = _user_folder(small["root"], "users_files")
    (user / "1").write_text("precious")  # a name a tile chunk would have
    gram = Path(small["gram"])
    chunk_dir = gram / "gram" / "c" / "1"
    for f in chunk_dir.iterdir():
        f.unlink()
    chunk_dir.rmdir()
    chunk_dir.symlink_to(user, target_is_directory=True)
    before = snapshot(small["root"])
    for argv in (["verify", str(gram), "--repair"], ["gram", small["train"], "--arch", ARCH, "--out", str(gram)],
                 ["gram", small["train"], "--arch", ARCH, "--out", str(gram), "--overwrite"],
                 ["solve", str(gram), "--data", small["train"], "--reg", "1e-3", "--out", str(small["root"] / "m")]):
        code, summary, err = cli(capsys, *argv)
        assert_refused(code, summary, err, "symbolic link", str(user))
    assert snapshot(small["root"]) == before and (user / "1").read_text() == "precious"


def test_a_link_between_two_chunk_folders_of_one_store_is_refused(small, capsys):
    """A link inside the store would read tile (1, j) as tile (0, j), checksums valid: refused too."""
    chunk_dir = Path(small["gram"]) / "gram" / "c" / "1"
    for f in chunk_dir.iterdir():
        f.unlink()
    chunk_dir.rmdir()
    chunk_dir.symlink_to(chunk_dir.parent / "0", target_is_directory=True)
    before = snapshot(small["root"])
    code, summary, err = cli(capsys, "solve", small["gram"], "--data", small["train"], "--reg", "1e-3",
                             "--solver", "cholesky", "--out", str(small["root"] / "m.zarr"))
    assert_refused(code, summary, err, "'gram/c/1' is a symbolic link", "(inside it)")
    assert snapshot(small["root"]) == before


def test_ingest_overwrite_refuses_a_dataset_store_holding_a_link_out(small, capsys):
    user = _user_folder(small["root"], "linked")
    os.symlink(user, Path(small["test"]) / "extra")
    src = _npz(small["root"])
    before = snapshot(small["root"])
    code, summary, err = cli(capsys, "ingest", src, small["test"], "--overwrite")
    assert_refused(code, summary, err, "symbolic link", str(user))
    assert snapshot(small["root"]) == before


def test_a_store_reached_through_a_link_at_its_root_resumes_but_is_never_deleted_through_it(small, capsys,
                                                                                          ray_local):
    elsewhere = small["root"] / "other_disk"
    elsewhere.mkdir()
    real = elsewhere / "g.zarr"
    assert main(["gram", small["train"], "--arch", ARCH, "--out", str(real), "--tile", "16", "--no-progress"]) == 0
    os.remove(real / "gram" / "c" / "0" / "1")
    link = small["root"] / "g.zarr"
    link.symlink_to(real, target_is_directory=True)
    code, summary, _ = cli(capsys, "gram", small["train"], "--arch", ARCH, "--out", str(link))
    assert code == 0 and summary["tiles_computed"] == 1 and summary["tiles_skipped"] == 5, summary
    data_link = small["root"] / "d.zarr"
    data_link.symlink_to(Path(small["test"]), target_is_directory=True)
    before = snapshot(small["root"])
    code, summary, err = cli(capsys, "ingest", _npz(elsewhere), str(data_link), "--overwrite")
    assert_refused(code, summary, err, "is a symbolic link")
    after = snapshot(small["root"])
    assert {k: v for k, v in after.items() if not k.endswith("src.npz")} == before


# -- 5. two concurrent first runs -------------------------------------------------------------------------------


def test_two_first_runs_on_one_out_give_one_store_and_one_clear_refusal(small, capsys, ray_local):
    """Deterministic interleavings of two first runs (ntk, nngp): the second driver is refused whether it comes
    while the first holds the lock (after creating the empty group) or after the first finished."""
    from kernelscale.gram.engine import _claim_store

    out = str(small["root"] / "g.zarr")
    first = _claim_store(out, overwrite=False)  # the first run has taken the lock, nothing created yet
    try:
        with pytest.raises(StoreError, match="being computed by another kernelscale driver"):
            compute_gram(small["train"], parse_arch(ARCH, "nngp"), out, tile=16, progress=False)
        assert "gram" not in zarr.open_group(out, mode="r")
    finally:
        first.release()
    compute_gram(small["train"], parse_arch(ARCH, "ntk"), out, tile=16, progress=False)
    code, summary, err = cli(capsys, "gram", small["train"], "--arch", ARCH, "--kernel", "nngp", "--out", out,
                             "--tile", "16")
    assert_refused(code, summary, err, "holds a different Gram", "kernel spec")
    assert zarr.open_group(out, mode="r").attrs["spec"]["kernel"] == "ntk"


def test_two_concurrent_first_runs_end_with_one_store_and_one_clear_refusal(small):
    """The issue's row as it was reproduced: ntk and nngp started at once on one --out (two processes, each with
    its own local Ray). Whichever wins, the other is refused with a message saying why."""
    from fault_helpers import last_json, start_cli

    out = str(small["root"] / "g.zarr")
    procs = {kernel: start_cli("gram", small["train"], "--arch", ARCH, "--kernel", kernel, "--out", out, "--tile",
                               "16", "--json", "--no-progress") for kernel in ("ntk", "nngp")}
    results = {kernel: (p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for kernel, p in procs.items()}
    codes = sorted(code for code, _, _ in results.values())
    assert codes == [0, 2], results
    winner = next(k for k, (code, _, _) in results.items() if code == 0)
    loser_code, loser_out, loser_err = results["nngp" if winner == "ntk" else "ntk"]
    message = last_json(loser_out)["error"]
    assert any(why in message for why in ("being computed by another kernelscale driver", "holds a different Gram",
                                          "created there meanwhile")), message
    assert "Traceback" not in loser_err
    assert zarr.open_group(out, mode="r").attrs["spec"]["kernel"] == winner
    from kernelscale.gram.engine import verify_gram

    assert verify_gram(out, progress=False)["ok"]


# -- 6. bounded input before compute --------------------------------------------------------------------------


def test_npz_with_a_huge_label_is_refused_without_building_a_class_list(tmp_path, capsys):
    src = tmp_path / "huge.npz"
    np.savez(src, images=synthetic_images(6), labels=np.array([0, 1, 2, 0, 1, 10**9]))
    before = snapshot(tmp_path)
    code, summary, err = cli(capsys, "ingest", str(src), str(tmp_path / "d.zarr"))
    assert_refused(code, summary, err, "labels out of range", "1000000000")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("argv, needles", [
    (["--arch", ARCH, "--tile", "100000"], ["--tile 100000 is larger than the matrix (40 x 40)"]),
    (["--arch", ARCH, "--tile", "0"], ["--tile must be an integer >= 1"]),
    (["--arch", "fc:depth=100000"], ["depth must be in 1..100"]),
    (["--arch", "fc:W_std=nan"], ["W_std and b_std must be finite"]),
    (["--arch", "fc:b_std=inf"], ["W_std and b_std must be finite"]),
    (["--arch", ARCH, "--workers", "0"], ["--workers must be >= 1"]),
])
def test_gram_refuses_unbounded_sizes_and_nan_parameters(small, capsys, argv, needles):
    out = small["root"] / "g.zarr"
    before = snapshot(small["root"])
    code, summary, err = cli(capsys, "gram", small["train"], *argv, "--out", str(out))
    assert_refused(code, summary, err, *needles)
    assert not out.exists() and snapshot(small["root"]) == before


def test_ingest_refuses_a_huge_resize(tmp_path, capsys):
    src = _npz(tmp_path)
    before = snapshot(tmp_path)
    code, summary, err = cli(capsys, "ingest", src, str(tmp_path / "d.zarr"), "--resize", "100000x100000")
    assert_refused(code, summary, err, "--resize 100000x100000", "at most 4096")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("images", [np.full((5, 4, 4, 1), 0.5, np.float32), synthetic_images(1)], ids=["constant", "one_row"])
def test_zca_on_constant_or_one_row_data_is_refused_and_writes_nothing(tmp_path, capsys, images):
    src = tmp_path / "c.npz"
    np.savez(src, images=images, labels=np.arange(len(images)) % 2)
    before = snapshot(tmp_path)
    code, summary, err = cli(capsys, "ingest", str(src), str(tmp_path / "d.zarr"), "--preprocess", "zca")
    assert_refused(code, summary, err, "--preprocess zca")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("argv, needles", [
    (["--tol", "1e10"], ["--tol must be in (0, 1)"]),
    (["--tol", "0"], ["--tol must be in (0, 1)"]),
    (["--tol", "nan"], ["--tol must be in (0, 1)"]),
    (["--operator", "ray", "--workers", "0"], ["--workers must be >= 1"]),
])
def test_solve_refuses_out_of_range_tol_and_workers(small, capsys, argv, needles):
    out = small["root"] / "m.zarr"
    before = snapshot(small["root"])
    code, summary, err = cli(capsys, "solve", small["gram"], "--data", small["train"], "--reg", "1e-3", *argv,
                             "--out", str(out))
    assert_refused(code, summary, err, *needles)
    assert not out.exists() and snapshot(small["root"]) == before


# -- 7. user files: --checkpoint and distill PNGs ----------------------------------------------------------------


def test_solve_never_overwrites_an_existing_checkpoint_file_without_overwrite(small, capsys):
    ckpt = small["root"] / "notes.npz"
    ckpt.write_text("my own file")
    argv = ["solve", small["gram"], "--data", small["train"], "--reg", "1e-3", "--precond", "none",
            "--out", str(small["root"] / "m.zarr"), "--checkpoint", str(ckpt)]
    before = snapshot(small["root"])
    code, summary, err = cli(capsys, *argv)
    assert_refused(code, summary, err, str(ckpt), "--overwrite")
    assert snapshot(small["root"]) == before
    code, summary, _ = cli(capsys, *argv, "--overwrite")
    assert code == 0 and ckpt.read_bytes()[:2] == b"PK"  # replaced by a solver checkpoint (.npz) only when asked


def test_distill_never_overwrites_an_existing_png_without_overwrite(small, capsys):
    out = small["root"] / "dist.zarr"
    png = small["root"] / "dist_images.png"
    png.write_text("a figure of mine")
    before = snapshot(small["root"])
    code, summary, err = cli(capsys, "distill", small["train"], "--arch", ARCH, "--ipc", "2", "--steps", "1",
                             "--target-batch", "12", "--out", str(out))
    assert_refused(code, summary, err, str(png), "--overwrite")
    assert not out.exists() and snapshot(small["root"]) == before


def test_distill_never_writes_a_png_through_a_link_even_with_overwrite(small, capsys):
    target = small["root"] / "precious.png"
    target.write_text("a figure of mine")
    (small["root"] / "dist_curves.png").symlink_to(target)
    before = snapshot(small["root"])
    code, summary, err = cli(capsys, "distill", small["train"], "--arch", ARCH, "--ipc", "2", "--steps", "1",
                             "--target-batch", "12", "--out", str(small["root"] / "dist.zarr"), "--overwrite")
    assert_refused(code, summary, err, "dist_curves.png is a symbolic link")
    assert snapshot(small["root"]) == before


# -- 8. disk full, worker errors --------------------------------------------------------------------------------


@pytest.fixture()
def tiny_disk(tmp_path):
    yield from Tmpfs.mounted(tmp_path / "tiny", "48k")


def _one_line_disk_full(code: int, summary: dict, err: str, path: str) -> None:
    assert code == 1, summary
    message = summary["error"]
    assert "no space left" in message and path in message and "free" in message, message
    assert "\n" not in message and "Traceback" not in err


def test_disk_full_during_ingest_is_one_line_and_the_rerun_succeeds(tmp_path, tiny_disk, capsys):
    src = tmp_path / "big.npz"
    np.savez(src, images=synthetic_images(400, (8, 8, 1)), labels=np.arange(400) % 4)
    out = str(tiny_disk.path / "d.zarr")
    code, summary, err = cli(capsys, "ingest", str(src), out)
    _one_line_disk_full(code, summary, err, out)
    assert list(tiny_disk.path.iterdir()) == []  # no partial store left behind
    tiny_disk.resize("4m")
    code, summary, _ = cli(capsys, "ingest", str(src), out)
    assert code == 0 and open_dataset(out).n == 400


def test_disk_full_writing_a_model_or_checkpoint_is_one_line_and_the_rerun_succeeds(small, tiny_disk, capsys):
    images = synthetic_images(1200, seed=5)
    train = npz_store(small["root"], "big", images, np.arange(1200) % 3)
    tr = open_dataset(train)
    gram = str(small["root"] / "big_gram.zarr")
    write_gram(gram, np.eye(1200) + 0.01, tile=400, data_fingerprint=tr.fingerprint)
    model, ckpt = str(tiny_disk.path / "m.zarr"), str(tiny_disk.path / "ck.npz")
    argv = ["solve", gram, "--data", train, "--reg", "1e-3", "--precond", "none", "--out", model]
    code, summary, err = cli(capsys, *argv, "--checkpoint", ckpt)  # 86 KB of solver state on a 48 KB disk
    _one_line_disk_full(code, summary, err, ckpt)
    assert list(tiny_disk.path.iterdir()) == []  # no stray ck.npz.tmp-PID.npz
    tiny_disk.resize("16k")
    code, summary, err = cli(capsys, *argv)  # a 29 KB model on a 16 KB disk
    _one_line_disk_full(code, summary, err, model)
    assert list(tiny_disk.path.iterdir()) == []  # no partial model blocking the rerun
    tiny_disk.resize("8m")
    code, summary, _ = cli(capsys, *argv, "--checkpoint", ckpt)
    assert code == 0 and summary["status"] == "converged" and os.path.exists(ckpt)


def test_disk_full_during_distill_is_one_line_and_the_rerun_finishes(small, tiny_disk, capsys):
    out = str(tiny_disk.path / "d.zarr")
    argv = ["distill", small["train"], "--arch", ARCH, "--ipc", "2", "--steps", "6", "--target-batch", "12",
            "--checkpoint-every", "2", "--out", out]
    code, summary, err = cli(capsys, *argv)
    _one_line_disk_full(code, summary, err, out)
    tiny_disk.resize("8m")
    resume = ["--resume"] if os.path.exists(out) else []  # a store holding a committed checkpoint, or none at all
    code, summary, _ = cli(capsys, *argv, *resume)
    assert code == 0 and summary["steps_done"] == 6, summary


def test_worker_errors_come_back_as_the_original_one_line_message(small, ray_local):
    def kernelscale_error(x1, x2, get):
        raise InputError("the original kernelscale message")

    def other_error(x1, x2, get):
        raise ValueError("boom\nsecond line")

    with pytest.raises(InputError) as info:
        compute_gram(small["train"], kernelscale_error, str(small["root"] / "a.zarr"), kernel_id="k1", tile=16,
                     progress=False, workers=1)
    assert str(info.value) == "the original kernelscale message"
    with pytest.raises(KernelscaleError) as info:
        compute_gram(small["train"], other_error, str(small["root"] / "b.zarr"), kernel_id="k2", tile=16,
                     progress=False, workers=1)
    assert str(info.value).endswith("ValueError: boom") and "\n" not in str(info.value)
    assert "\x1b[" not in str(info.value) and "Traceback" not in str(info.value)


def test_an_error_in_a_ray_actor_reaches_the_cli_as_its_one_line_message(small, capsys, ray_local):
    from fault_helpers import flip_byte

    flip_byte(Path(small["gram"]) / "gram" / "c" / "0" / "1", 0.5)
    code, summary, err = cli(capsys, "solve", small["gram"], "--data", small["train"], "--reg", "1e-3",
                             "--operator", "ray", "--workers", "1", "--precond", "none",
                             "--out", str(small["root"] / "m.zarr"))
    assert_refused(code, summary, err, "tile (0, 1) is corrupt", "kernelscale verify")
    assert "RayTaskError" not in summary["error"]


def test_whole_gram_in_memory_is_refused_when_it_cannot_fit(small, capsys, monkeypatch):
    from kernelscale.krr import solver

    monkeypatch.setattr(solver, "available_memory", lambda: 10_000)  # bytes: a 40 x 40 float64 Gram is 12,800
    for argv, needle in ((["--solver", "cholesky"], "--solver cholesky needs"),
                         (["--operator", "memory"], "--operator memory needs")):
        code, summary, err = cli(capsys, "solve", small["gram"], "--data", small["train"], "--reg", "1e-3", *argv,
                                 "--out", str(small["root"] / "m.zarr"))
        assert_refused(code, summary, err, needle, "40 x 40")


def test_stores_claiming_huge_arrays_are_refused_before_reading_them(small, capsys):
    model = str(small["root"] / "model.zarr")
    assert main(["solve", small["gram"], "--data", small["train"], "--reg", "1e-3", "--solver", "cholesky",
                 "--out", model, "--no-progress"]) == 0
    _edit_meta(model, "alpha", lambda m: (m.__setitem__("shape", [10**12, 3]),
                                          m["chunk_grid"]["configuration"].__setitem__("chunk_shape", [65536, 3])))
    capsys.readouterr()
    code, summary, err = cli(capsys, "evaluate", model, "--cross", small["cross"], "--test", small["test"])
    assert_refused(code, summary, err, "array 'alpha' of shape (1000000000000, 3)", "more than half the available")


# -- 9. Ray token authentication before connecting to a cluster --------------------------------------------------


def test_remote_cluster_without_token_auth_is_warned_about(caplog):
    with caplog.at_level("WARNING", logger="kernelscale.runtime"):
        assert check_remote_auth("10.1.2.3:6379", environ={}) == "off"
    assert "without token authentication" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="kernelscale.runtime"):
        assert check_remote_auth("127.0.0.1:6379", environ={}) == "off"
    assert caplog.text == ""  # a loopback cluster is this machine's own


def test_token_mode_without_a_token_is_refused_and_a_readable_token_file_is_warned_about(tmp_path, caplog):
    with pytest.raises(InputError, match="RAY_AUTH_MODE=token but no token"):
        check_remote_auth("10.1.2.3:6379", environ={"RAY_AUTH_MODE": "token"}, home=str(tmp_path))
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("secret")
    token.chmod(0o644)
    with caplog.at_level("WARNING", logger="kernelscale.runtime"):
        assert check_remote_auth("10.1.2.3:6379", environ={"RAY_AUTH_MODE": "token"}, home=str(tmp_path)) == "token"
    assert "readable by other users" in caplog.text
    token.chmod(0o600)
    caplog.clear()
    with caplog.at_level("WARNING", logger="kernelscale.runtime"):
        check_remote_auth("10.1.2.3:6379", environ={"RAY_AUTH_MODE": "token"}, home=str(tmp_path))
    assert caplog.text == ""
    assert check_remote_auth("x:1", environ={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t"}) == "token"


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_ray_up_configs_give_nodes_the_token_file_not_a_shell_variable(name):
    cfg = yaml.safe_load((ROOT / "cluster" / name).read_text())
    commands = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "$RAY_AUTH_TOKEN" not in commands and "RAY_AUTH_MODE=token" in commands
    assert cfg["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("chmod 600 ~/.ray/auth_token" in c for c in cfg["setup_commands"])
