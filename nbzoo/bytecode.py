"""Compile the bytecode of the modules the notebooks import, once, at install time.

``uv pip install --compile-bytecode`` compiles every module of the environment: about 17,700
files, 47 s of CPU of the 58 s the whole install took on the 2-core machine where ``make demo``
is timed. The notebooks import about 4,800 of them. Importing those with bytecode writing on,
and compiling the folders the notebooks import from lazily (the ONNX exporter, the models'
tokenizers, generation), compiles just them: about 20 s of CPU, imports included. Bytecode is
written whatever PYTHONDONTWRITEBYTECODE says, as ``--compile-bytecode`` does: with that
variable set (CI machines set it) and no .pyc files, every kernel would compile its imports
again (about 11 s of CPU each).

The imports run in two processes side by side, each a chain of its own (:data:`CHAINS`): torch
and what imports it (transformers and the models), and the rest (Jupyter, plotting, pandas, SciPy,
scikit-learn, ONNX); the two take about as long, so on two cores the step takes half the time of
one process. Meanwhile this process compiles nbzoo's own files and the :data:`LAZY` folders.
What nbzoo itself imports is read from its source (:func:`nbzoo_imports`) and added to the
chains, so a new dependency is compiled without editing the lists here.
"""

from __future__ import annotations

import ast
import compileall
import importlib
import importlib.util
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

# Roots whose modules import torch (tfrecord: its reader for torch): they go to the torch chain,
# after torch itself.
TORCH_SIDE = ("torch", "transformers", "safetensors", "tfrecord")
CHAINS = (
    (
        "torch",
        "torch.onnx",
        "torch.distributed.run",
        "transformers",
        "transformers.models.albert.modeling_albert",
        "transformers.models.roberta.modeling_roberta",
        "transformers.models.reformer.modeling_reformer",
        "transformers.models.longformer.modeling_longformer",
        "transformers.models.bert.modeling_bert",
    ),
    (
        "papermill",
        "nbclient",
        "ipykernel.kernelapp",
        "ipywidgets",
        "matplotlib.pyplot",
        "matplotlib_inline.backend_inline",
        "pandas",
        "scipy.stats",
        "sklearn.metrics",
        "onnx",
        "onnxruntime",
        "onnxruntime.transformers.optimizer",
        "onnxruntime.quantization",
        "onnxslim",
        "tqdm.auto",
    ),
)
# Folders (package, subfolder) whose modules load only while a notebook runs: compiled whole.
LAZY = (
    ("torch", "onnx"),
    ("transformers", "generation"),
    ("transformers", "models/auto"),
    ("transformers", "models/albert"),
    ("transformers", "models/roberta"),
    ("transformers", "models/reformer"),
    ("transformers", "models/longformer"),
    ("transformers", "models/bert"),
    ("transformers", "models/gpt2"),
    ("onnxslim", ""),
    ("onnxruntime", "transformers"),
    ("onnxruntime", "quantization"),
)
NBZOO = Path(__file__).resolve().parent


def nbzoo_imports(package: Path = NBZOO) -> list[str]:
    """The modules outside the standard library that nbzoo's source imports, anywhere in a file
    (imports inside functions too), sorted."""
    found = set()
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
    own = package.name
    return sorted(
        name
        for name in found
        if (root := name.partition(".")[0]) not in sys.stdlib_module_names and root != own
    )


def chains(extra: Iterable[str] = ()) -> list[list[str]]:
    """:data:`CHAINS` with ``extra`` modules appended, each to the chain of its root."""
    result = [list(chain) for chain in CHAINS]
    for name in extra:
        chain = result[0] if name.partition(".")[0] in TORCH_SIDE else result[1]
        if name not in chain:
            chain.append(name)
    return result


def import_all(modules: Iterable[str]) -> int:
    """Import ``modules`` with bytecode writing on; one that is not installed (an optional
    dependency such as torch_npu) is passed over. Returns how many modules are loaded."""
    sys.dont_write_bytecode = False
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    return len(sys.modules)


def lazy_folders() -> list[Path]:
    spec = importlib.util.find_spec
    return [Path(spec(package).origin).parent / sub for package, sub in LAZY]


def compile_all() -> list[int]:
    """Import every chain in a process of its own while compiling nbzoo and the :data:`LAZY`
    folders here; return how many modules each chain's process loaded."""
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "nbzoo.bytecode", "--import", ",".join(chain)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for chain in chains(nbzoo_imports())
    ]
    folders = [NBZOO, *lazy_folders()]
    compiled = all(compileall.compile_dir(str(f), quiet=2) for f in folders)
    outputs = [worker.communicate()[0] for worker in workers]
    failed = [w.args[-1] for w in workers if w.returncode != 0]
    if failed or not compiled:
        raise SystemExit(f"nbzoo.bytecode: failed on {', '.join(failed) or 'the lazy folders'}")
    return [int(out.split()[0]) for out in outputs]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--import"]:  # one chain, in a worker of compile_all
        print(import_all(argv[1].split(",")), flush=True)
        return
    counts = compile_all()
    print(
        f"nbzoo.bytecode: {' + '.join(map(str, counts))} modules compiled or checked "
        f"in {len(counts)} processes, nbzoo and {len(LAZY)} lazy folders compiled",
        flush=True,
    )


if __name__ == "__main__":
    main()
