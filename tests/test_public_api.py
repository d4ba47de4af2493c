"""The public API: every name in ``kernelscale.__all__`` imports and is described in the API reference (the package
docstring, which lists each public name with a line on what it does)."""

import importlib
import re

import kernelscale


def test_every_public_name_imports_and_is_not_private():
    for name in kernelscale.__all__:
        assert not name.startswith("_"), name
        assert getattr(kernelscale, name) is not None, name


def test_every_public_name_is_documented_in_the_package_api_reference():
    documented = set(re.findall(r"``(\w+)``", kernelscale.__doc__))
    assert set(kernelscale.__all__) <= documented, sorted(set(kernelscale.__all__) - documented)


def test_the_api_names_the_workflow_functions_of_the_user_guide():
    assert {"ingest", "compute_gram", "solve", "distill", "evaluate", "make_kip", "cg", "parse_arch", "open_dataset",
            "open_gram", "open_distilled", "InputError", "StoreError"} <= set(kernelscale.__all__)


def test_public_names_are_the_implementing_objects_not_copies():
    assert kernelscale.compute_gram is importlib.import_module("kernelscale.gram.engine").compute_gram
    assert kernelscale.evaluate_support is importlib.import_module("kernelscale.kip.run").evaluate
