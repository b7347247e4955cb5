"""nbzoo.bytecode: which modules each install-time import process compiles."""

from __future__ import annotations

import sys

from nbzoo import bytecode


def test_nbzoo_imports_are_read_from_source_including_imports_inside_functions(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("import json\nfrom pkg import sub\n")
    (package / "sub.py").write_text(
        "import numpy as np\n\ndef f():\n    from onnxruntime.transformers import optimizer\n"
        "    from . import other\n"
    )
    assert bytecode.nbzoo_imports(package) == ["numpy", "onnxruntime.transformers"]


def test_what_imports_torch_is_imported_after_torch_and_the_rest_beside_it():
    torch_chain, other_chain = bytecode.chains(["safetensors.torch", "tokenizers", "torch"])
    assert torch_chain[0] == "torch" and torch_chain.count("torch") == 1
    assert torch_chain[-1] == "safetensors.torch"
    assert "tokenizers" in other_chain
    assert not any(name.partition(".")[0] in bytecode.TORCH_SIDE for name in other_chain)


def test_nbzoo_imports_nothing_the_chains_would_import_in_the_wrong_process():
    """Every third-party module of nbzoo's lands in a chain, none of the standard library."""
    found = bytecode.nbzoo_imports()
    assert "torch" in found and "onnxruntime" in found
    assert not any(name.partition(".")[0] in sys.stdlib_module_names for name in found)
    assert set(found) <= {name for chain in bytecode.chains(found) for name in chain}


def test_an_optional_module_that_is_not_installed_is_passed_over():
    before = len(sys.modules)
    assert bytecode.import_all(["json", "nbzoo_no_such_module"]) >= before
