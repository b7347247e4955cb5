import textwrap

import pytest
import torch

from nbzoo import cpus, device
from tests.conftest import run_python


def test_auto_picks_cpu_on_a_machine_without_accelerators():
    if torch.cuda.is_available() or device.npu_available():
        pytest.skip("this machine has an accelerator")
    assert device.resolve_device("auto") == "cpu"


def test_explicit_missing_devices_fail_with_a_clear_message():
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            device.resolve_device("cuda")
    if not device.npu_available():
        with pytest.raises(RuntimeError, match="no usable Ascend NPU"):
            device.resolve_device("npu")
    with pytest.raises(ValueError, match="one of auto, cpu, cuda, npu"):
        device.resolve_device("tpu")


@pytest.mark.parametrize(
    ("request_", "kind", "expected"),
    [
        ("auto", "cpu", "fp32"),
        ("auto", "npu", "fp16"),
        ("O0", "cuda", "fp32"),
        ("O1", "cuda", "fp16"),
        ("O1", "cpu", "fp16"),
        ("O2", "npu", "O2"),
        ("O2", "cpu", "O2"),
        ("fp16", "cpu", "fp16"),
        ("bf16", "cuda", "bf16"),
        ({"cuda": "O1", "npu": "O2", "cpu": "O2"}, "cuda", "fp16"),
        ({"cuda": "O1", "npu": "O2", "cpu": "O2"}, "npu", "O2"),
        ({"cuda": "fp32", "npu": "O2", "cpu": "O2"}, "cuda", "fp32"),
    ],
)
def test_precision_policy_maps_apex_levels_onto_native_amp(request_, kind, expected):
    assert device.resolve_precision(request_, kind) == expected


def test_a_precision_per_device_kind_names_the_missing_kind():
    with pytest.raises(ValueError, match="a level for cuda, npu but not for cpu"):
        device.resolve_precision({"cuda": "O1", "npu": "O2"}, "cpu")
    with pytest.raises(ValueError, match="keys must be among cpu, cuda, npu; got 'gpu'"):
        device.resolve_precision({"gpu": "O1"}, "cpu")


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match="precision must be one of"):
        device.resolve_precision("fp8", "cpu")


def test_runtime_autocast_uses_bf16_on_cpu():
    rt = device.Runtime(kind="cpu", precision="bf16")
    with rt.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    rt32 = device.Runtime(kind="cpu", precision="fp32")
    with rt32.autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32


def test_cpu_share_is_nbzoo_demos_share_else_the_affinity(monkeypatch):
    import os

    monkeypatch.setenv("NBZOO_CPUS", "3")
    assert cpus.share() == 3
    for unusable in ("", "0", "two"):
        monkeypatch.setenv("NBZOO_CPUS", unusable)
        assert cpus.share() == len(os.sched_getaffinity(0))


def test_seeding_makes_runs_repeatable():
    device.seed_everything(3)
    a = torch.rand(5)
    device.seed_everything(3)
    assert torch.equal(a, torch.rand(5))


def test_describe_lists_the_environment():
    table = device.describe(device.setup("cpu", "fp32", 0))
    for row in ("torch", "transformers", "device", "precision", "CANN", "active patches"):
        assert row in table.index
    assert table.loc["device", "value"].startswith("cpu")


def test_a_broken_torch_npu_does_not_break_import_torch(tmp_path):
    """torch_npu registers a 'torch.backends' entry point that torch auto-loads on import. On a
    machine without CANN that import fails; nbzoo.device switches auto-loading off first."""
    pkg = tmp_path / "site"
    (pkg / "torch_npu").mkdir(parents=True)
    (pkg / "torch_npu" / "__init__.py").write_text(
        "raise ImportError('libhccl.so: cannot open shared object file (no CANN)')\n"
        "def _autoload():\n    pass\n"
    )
    dist = pkg / "torch_npu-2.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.1.0\n")
    (dist / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    env = {"PYTHONPATH": str(pkg), "TORCH_DEVICE_BACKEND_AUTOLOAD": ""}
    plain = run_python(
        "import os; os.environ.pop('TORCH_DEVICE_BACKEND_AUTOLOAD'); import torch", env=env
    )
    guarded = run_python(
        textwrap.dedent(
            """
            import os; os.environ.pop('TORCH_DEVICE_BACKEND_AUTOLOAD')
            from nbzoo import device
            import torch
            print(device.resolve_device('auto'), device.npu_available())
            """
        ),
        env=env,
    )
    assert plain.returncode != 0 and "CANN" in plain.stderr  # what users hit without the guard
    assert guarded.returncode == 0, guarded.stderr
    assert guarded.stdout.split() == ["cpu", "False"]
