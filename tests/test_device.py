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


# /proc/cpuinfo flags of the CPUs this project's machines come with (the AVX-512 part of them)
AVX2_ONLY = {"avx", "avx2", "fma"}
EPYC_AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}
AVX512_FP16 = EPYC_AVX512_BF16 | {"avx512_fp16"}
AMX = EPYC_AVX512_BF16 | {"amx_tile", "amx_bf16", "amx_int8", "amx_fp16"}
PER_KIND = {"cuda": "O1", "npu": "O2", "cpu": "O2"}


def half(flags, capability="AVX512", onednn_isa=""):
    return device.cpu_half_formats(flags, capability, onednn_isa)


@pytest.mark.parametrize(
    ("flags", "capability", "fast"),
    [
        (AVX2_ONLY, "AVX2", set()),
        (EPYC_AVX512_BF16, "AVX512", {"bf16"}),
        (EPYC_AVX512_BF16, "AVX2", set()),  # ATEN_CPU_CAPABILITY=avx2 on that CPU
        (AVX512_FP16, "AVX512", {"fp16", "bf16"}),
        (AMX, "AVX512", {"fp16", "bf16"}),
        (set(), "DEFAULT", set()),  # no /proc/cpuinfo
    ],
)
def test_the_fast_half_formats_are_read_from_the_cpu_flags_and_torchs_capability(
    flags, capability, fast
):
    assert half(flags, capability).fast == fast


def test_onednn_capped_below_avx512_computes_no_half_format_fast():
    assert half(AMX, onednn_isa="AVX2").fast == frozenset()
    assert half(AMX, onednn_isa="AVX512_CORE_AMX").fast == {"fp16", "bf16"}


@pytest.mark.parametrize(
    ("flags", "capability", "level", "path"),
    [
        (AVX2_ONLY, "AVX2", "O2", device.O2_FP32_COMPUTE),
        (AVX2_ONLY, "AVX2", "fp16", "fp32"),
        (AVX2_ONLY, "AVX2", "bf16", "fp32"),
        (EPYC_AVX512_BF16, "AVX512", "O2", device.O2_FP32_COMPUTE),
        (EPYC_AVX512_BF16, "AVX512", "O1", "bf16"),
        (EPYC_AVX512_BF16, "AVX512", "fp16", "bf16"),
        (EPYC_AVX512_BF16, "AVX512", "bf16", "bf16"),
        (EPYC_AVX512_BF16, "AVX512", "auto", "fp32"),
        (AVX512_FP16, "AVX512", "O2", "O2"),
        (AMX, "AVX512", "fp16", "fp16"),
        (AMX, "AVX512", "O2", "O2"),
    ],
)
def test_a_presets_cpu_entry_takes_the_nearest_path_the_cpu_computes_fast(
    flags, capability, level, path
):
    chosen = device.choose_precision({"cuda": "O1", "cpu": level}, "cpu", half(flags, capability))
    assert chosen.path == path
    assert (chosen.why == "") == (chosen.path == chosen.asked)


def test_the_reason_names_the_missing_instructions_and_how_to_ask_for_the_level():
    chosen = device.choose_precision(PER_KIND, "cpu", half(EPYC_AVX512_BF16))
    assert chosen.asked == "O2" and chosen.path == device.O2_FP32_COMPUTE
    assert "fp16: none of avx512_fp16 / amx_fp16" in chosen.why
    assert "precision='O2'" in chosen.why


@pytest.mark.parametrize("level", ["O2", "O1", "fp16", "bf16"])
def test_one_level_is_honoured_as_asked_on_any_cpu(level):
    chosen = device.choose_precision(level, "cpu", half(AVX2_ONLY, "AVX2"))
    assert chosen.path == device.APEX_LEVELS.get(level, level) and chosen.why == ""


def test_an_accelerators_entry_is_never_changed_by_the_cpu():
    slow = half(AVX2_ONLY, "AVX2")
    assert device.choose_precision(PER_KIND, "npu", slow).path == "O2"
    assert device.choose_precision(PER_KIND, "cuda", slow).path == "fp16"


def test_setup_says_which_path_it_took_and_why(monkeypatch, capsys):
    avx2_only = half(AVX2_ONLY, "AVX2")
    monkeypatch.setattr(device, "cpu_half_formats", lambda: avx2_only)
    rt = device.setup("cpu", {"cpu": "fp16", "cuda": "fp16"}, 0)
    assert (rt.precision, rt.level) == ("fp32", "fp16")
    assert rt.grad_scaler().is_enabled()  # the loss is scaled as the fp16 level asks
    out = capsys.readouterr().out
    assert out.startswith("precision: the preset's fp16 for a CPU") and "took fp32 (" in out
    record = device.precision_record(rt)
    assert (record["asked"], record["took"]) == ("fp16", "fp32") and record["why"]


def test_aten_cpu_capability_avx2_mimics_a_cpu_without_fast_half_formats():
    result = run_python(
        "from nbzoo import device; print(sorted(device.cpu_half_formats().fast))",
        env={"ATEN_CPU_CAPABILITY": "avx2"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]"]


def test_the_cpu_description_names_the_model_and_only_the_flags_that_decide_speed(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse2 avx2 fma avx512f "
        "avx512_bf16 amx_tile\n\nprocessor\t: 1\nmodel name\t: Other\nflags\t\t: sse2\n"
    )
    described = device.cpu_description(cpuinfo)
    assert described["model_name"] == "Example CPU 9000"
    assert described["flags"] == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"]
    assert described["cpus"] >= 1 and described["torch_cpu_capability"]
