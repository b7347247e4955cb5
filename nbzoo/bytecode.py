"""Compile the bytecode of the modules the notebooks import, once, at install time.

``uv pip install --compile-bytecode`` compiles every module of the environment: about 17,700
files, 47 s of CPU of the 58 s the whole install took on the 2-core machine where ``make demo``
is timed. The notebooks import about 3,800 of them. Importing those with bytecode writing on,
and compiling the folders the notebooks import from lazily (the ONNX exporter, the models'
tokenizers, generation), compiles just them: about 15 s of CPU, imports included. Bytecode is
written whatever PYTHONDONTWRITEBYTECODE says, as ``--compile-bytecode`` does: with that
variable set (CI machines set it) and no .pyc files, every kernel would compile its imports
again (about 11 s of CPU each).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

MODULES = (
    "torch",
    "torch.onnx",
    "torch.distributed.run",
    "transformers",
    "transformers.models.albert.modeling_albert",
    "transformers.models.roberta.modeling_roberta",
    "transformers.models.reformer.modeling_reformer",
    "transformers.models.longformer.modeling_longformer",
    "transformers.models.bert.modeling_bert",
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


def compile_all() -> int:
    """Import the notebooks' modules with bytecode writing on, compile the :data:`LAZY` folders;
    return how many modules were loaded."""
    # the lazy folders compile in a second process, on the second core, while this one imports
    spec = importlib.util.find_spec
    folders = [str(Path(spec(package).origin).parent / sub) for package, sub in LAZY]
    lazy = subprocess.Popen([sys.executable, "-m", "compileall", "-q", "-q", *folders])
    sys.dont_write_bytecode = False
    for module in MODULES:
        importlib.import_module(module)
    import nbzoo

    for info in pkgutil.walk_packages(nbzoo.__path__, "nbzoo."):
        importlib.import_module(info.name)
    if lazy.wait() != 0:
        raise SystemExit(f"nbzoo.bytecode: compileall failed on {', '.join(folders)}")
    return len(sys.modules)


def main() -> None:
    print(f"nbzoo.bytecode: {compile_all()} modules compiled or checked", flush=True)


if __name__ == "__main__":
    main()
