"""The command line: a tiny demo run, the info subcommand and `python -m dkm_kernels`."""
import os
import re
import subprocess
import sys

import pytest
import torch

from dkm_kernels import cli
from export_files import NOT_EXPORTS, save_small_export


def test_quick_demo_prints_the_table(capsys, tmp_path):
    threads = torch.get_num_threads()
    mlpackage = tmp_path / "digits.mlpackage"
    try:
        assert cli.main(["--quick", "--configs", "1/1", "--no-progress", "--threads", "1",
                         "--coreml", str(mlpackage)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    try:
        import coremltools  # noqa: F401
    except ImportError:
        assert "pip install coremltools" in out
    else:  # the DKM model is written as a Core ML model, its weight file's size printed
        size = cli.weight_file_bytes(str(mlpackage))
        assert f"Core ML: DKM 1/1 written to {mlpackage}, weight file {size} B" in out
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line
            for line in out.splitlines() if line.startswith("| ")}
    assert {("float32", "-"), ("k-means", "1/1"), ("DKM", "1/1")} <= set(rows)

    def accuracy(key):
        return float(rows[key].split("|")[4].strip().rstrip("%"))

    # Even after one epoch, fine-tuning with DKM beats post-training k-means at 1 bit.
    assert accuracy(("DKM", "1/1")) > accuracy(("k-means", "1/1"))
    assert "27.9x" in rows[("DKM", "1/1")]
    assert "total time" in out


def test_info_describes_a_saved_model(tmp_path, capsys):
    path = tmp_path / "model.pt"
    save_small_export(path)
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3/1" in out and "(512 weights)" in out and "float16" in out
    assert "int8" not in out
    export = torch.load(path, weights_only=True)
    export["layer_configs"]["0"]["lut_quantization"] = "uint8"
    export["codebooks"]["0"] = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    export["lut_scales"] = {"0": torch.ones(1, dtype=torch.float16)}
    export["lut_zero_points"] = {"0": torch.full((1,), 127, dtype=torch.uint8)}
    torch.save(export, path)
    assert cli.main(["info", str(path)]) == 0
    assert "3/1 k=8 groups=1 uint8 (512 weights)" in capsys.readouterr().out


def _corrupted_export(path):
    save_small_export(path)
    export = torch.load(path, weights_only=True)
    export["layer_configs"]["0"]["bits"] = 17
    torch.save(export, path)


# (case, how the file is made, the words of the one-line error)
BAD_FILES = [
    ("missing file", lambda path: None, "No such file"),
    ("directory", lambda path: path.mkdir(), "Is a directory"),
    *((case, write, f"not a dkm_kernels export.*{words}") for case, write, words in NOT_EXPORTS),
    ("corrupted export", _corrupted_export, r"layer '0', field 'bits'"),
]


@pytest.mark.parametrize("make,pattern", [case[1:] for case in BAD_FILES],
                         ids=[case[0] for case in BAD_FILES])
def test_info_on_a_bad_file_prints_one_line_and_fails(make, pattern, tmp_path, capsys):
    path = tmp_path / "model.pt"
    make(path)
    assert cli.main(["info", str(path)]) != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dkm-kernels info: error: ")
    assert re.search(pattern, lines[0])


def test_info_exits_non_zero_without_a_traceback(tmp_path):
    path = tmp_path / "model.pt"
    _corrupted_export(path)
    result = run_module("info", str(path))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "field 'bits'" in result.stderr


def run_module(*args):
    """`python -m dkm_kernels ARGS` on this checkout's package."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    return subprocess.run([sys.executable, "-m", "dkm_kernels", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_module_entry_point_help():
    result = run_module("--help")
    assert result.returncode == 0 and "demo" in result.stdout and "info" in result.stdout
