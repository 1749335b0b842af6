"""The command line: a tiny demo run, the info subcommand and `python -m dkm_kernels`."""
import os
import subprocess
import sys

import torch
import torch.nn as nn

from dkm_kernels import cli, compress_model


def test_quick_demo_prints_the_table(capsys):
    threads = torch.get_num_threads()
    try:
        assert cli.main(["--quick", "--configs", "1/1", "--no-progress", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
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
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    compressor = compress_model(model, bits=3, skip_first_last=False, small_layer_threshold=0,
                                tau=1e-3)
    path = tmp_path / "model.pt"
    compressor.save_compressed(path)
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3/1" in out and "(512 weights)" in out and "float16" in out


def test_module_entry_point_help():
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    result = subprocess.run([sys.executable, "-m", "dkm_kernels", "--help"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "demo" in result.stdout and "info" in result.stdout
