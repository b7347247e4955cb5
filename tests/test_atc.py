"""nbzoo.export.atc: the seed's ATC command lines, precision.ini, npu-smi parsing, and what runs
(or is skipped) depending on whether `atc` is on PATH."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nbzoo.export import atc
from nbzoo.export.cann_standins import SEED_NPU_SMI as NPU_SMI  # the seed's `npu-smi info`

# The two ATC commands of seeds/002_albert.md ("执行ATC命令"), verbatim.
SEED_SEQ128_BS32 = (
    "atc --input_format=ND --framework=5 --model=./outputs/albert_seq128_bs32_opt.onnx "
    "--output=./outputs/albert_seq128_bs32 --log=error --soc_version=${chip_name} "
    '--input_shape="input_ids:32,128;attention_mask:32,128;token_type_ids:32,128" '
    '--optypelist_for_implmode="Gelu" --op_select_implmode=high_performance'
)
SEED_SEQ16_BS64 = (
    "atc --input_format=ND --framework=5 --model=./outputs/albert_seq16_bs64_opt.onnx "
    "--output=./outputs/albert_seq16_bs64 --log=error --soc_version=${chip_name} "
    '--input_shape="input_ids:64,16;attention_mask:64,16;token_type_ids:64,16" '
    "--op_precision_mode=precision.ini"
)


# shared/seeds beside the checkout (/work/main) or beside the folder of worktrees (/work/wt/x)
SEED_FILE = next(
    (
        p / "shared" / "seeds" / "002_albert.md"
        for p in Path(__file__).resolve().parents[2:4]
        if (p / "shared" / "seeds" / "002_albert.md").exists()
    ),
    Path("shared/seeds/002_albert.md"),
)


def test_seq128_command_is_the_seeds():
    argv = atc.albert_atc_command(
        "./outputs/albert_seq128_bs32_opt.onnx",
        "./outputs/albert_seq128_bs32",
        32,
        128,
        "${chip_name}",
    )
    assert atc.format_command(argv) == SEED_SEQ128_BS32
    assert "--op_precision_mode=precision.ini" not in argv
    # the argument vector itself carries no shell quotes
    assert "--input_shape=input_ids:32,128;attention_mask:32,128;token_type_ids:32,128" in argv
    assert "--optypelist_for_implmode=Gelu" in argv


def test_seq16_command_is_the_seeds():
    argv = atc.albert_atc_command(
        "./outputs/albert_seq16_bs64_opt.onnx",
        "./outputs/albert_seq16_bs64",
        64,
        16,
        "${chip_name}",
    )
    assert atc.format_command(argv) == SEED_SEQ16_BS64
    assert not any(a.startswith("--op_select_implmode") for a in argv)


@pytest.mark.skipif(not SEED_FILE.exists(), reason="shared/seeds not beside the checkout")
def test_expected_lines_are_in_the_seed():
    text = SEED_FILE.read_text(encoding="utf-8")
    assert SEED_SEQ128_BS32 in text and SEED_SEQ16_BS64 in text


def test_other_shapes_follow_the_same_rule():
    argv = atc.albert_atc_command("m.onnx", "m", 8, 64, "Ascend310P3")
    assert atc.format_command(argv) == (
        "atc --input_format=ND --framework=5 --model=m.onnx --output=m --log=error "
        '--soc_version=Ascend310P3 --input_shape="input_ids:8,64;attention_mask:8,64;'
        'token_type_ids:8,64" --optypelist_for_implmode="Gelu" '
        "--op_select_implmode=high_performance"
    )


def test_precision_ini_is_cann_format(tmp_path):
    path = atc.write_precision_ini(tmp_path / "precision.ini")
    assert path.read_text() == "[ByOpType]\nGelu=high_precision\n"
    assert [p.name for p in tmp_path.iterdir()] == ["precision.ini"]


def test_soc_version_from_npu_smi():
    assert atc.parse_npu_smi(NPU_SMI) == "Ascend910A"
    assert atc.parse_npu_smi(NPU_SMI.replace("910A    ", "310P3   ")) == "Ascend310P3"
    assert atc.parse_npu_smi("command not found") is None


def test_without_atc_the_step_is_skipped_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no atc, no npu-smi
    model = tmp_path / "albert_seq16_bs64_sim.onnx"
    model.write_bytes(b"not used")
    run = atc.convert_albert(model, tmp_path / "albert_seq16_bs64", 64, 16, cwd=tmp_path)
    assert not run.ran and run.returncode is None
    assert run.message.startswith("skipped:") and "not on PATH" in run.message
    assert run.command.startswith("atc --input_format=ND --framework=5 --model=")
    assert "--soc_version=${chip_name}" in run.command
    assert (tmp_path / "precision.ini").exists()  # written into cwd for seq 16 all the same
    assert run.command.endswith("--op_precision_mode=precision.ini")  # the seed's: in cwd
    run128 = atc.convert_albert(
        tmp_path / "albert_seq128_bs32_sim.onnx", "out", 32, 128, cwd=tmp_path
    )
    assert "--op_select_implmode=high_performance" in run128.command and not run128.ran


def _stand_in(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_with_atc_on_path_it_runs_the_exact_argv(tmp_path, monkeypatch):
    """A stand-in `atc` and `npu-smi` on PATH record what nbzoo runs (the real tools need CANN)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "argv.txt"
    _stand_in(bin_dir, "npu-smi", f"cat <<'EOF'\n{NPU_SMI}EOF\n")
    _stand_in(
        bin_dir,
        "atc",
        f'for a in "$@"; do echo "$a" >> {log}; done\n'
        'for a in "$@"; do case "$a" in --output=*) touch "${a#--output=}.om";; esac; done\n',
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run = atc.convert_albert(tmp_path / "m_sim.onnx", tmp_path / "m", 32, 128)
    assert run.ran and run.returncode == 0 and run.om_path == tmp_path / "m.om"
    assert (
        log.read_text().splitlines()
        == atc.albert_atc_command(tmp_path / "m_sim.onnx", tmp_path / "m", 32, 128, "Ascend910A")[
            1:
        ]
    )
    _stand_in(bin_dir, "atc", "echo 'E19999: unsupported op' >&2\nexit 3\n")
    failed = atc.convert_albert(tmp_path / "m_sim.onnx", tmp_path / "m2", 32, 128)
    assert failed.ran and failed.returncode == 3 and "E19999" in failed.message
