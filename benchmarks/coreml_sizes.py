"""Core ML deployment, measured: model sizes, and coremltools' own DKM side by side.

    python benchmarks/coreml_sizes.py                       # both -> results/coreml_both.json
    python benchmarks/coreml_sizes.py --part sizes          # -> results/coreml_sizes.json
    python benchmarks/coreml_sizes.py --part speed --repeats 3 --cases layer

sizes: the main job's models (python -m dkm_kernels: DigitsCNN trained on scikit-learn's digits,
every Conv2d and Linear weight DKM-fine-tuned at each configuration) converted three ways, bytes
of each: the float model converted dense (float16 weights), the DKM model converted palettized
(to_coreml: the learned palettes and indices), and the .dkm.pt export (its tensors, and the file
torch.save writes). Core ML sizes are the weight file of the saved .mlpackage (weights/weight.bin:
every tensor of the program; the package adds the program description, a few KB). At d > 1 the
convolutions use vector_axis="output", the layout Core ML can hold for a 3x3 convolution (the main
job's flattened 4/4 and 4/8 cannot be deployed); the Linear layers keep the flattened layout,
whose vectors lie along their input features.

speed: one training step (forward, backward, SGD step; for coremltools also palettizer.step())
with coremltools' DKMPalettizer and with dkm_kernels at the same configuration (its
DKMPalettizerConfig translated by from_coremltools_config: same bits, vector size, tau
(palett_tau 1e-4), iterations (kmeans_max_iter 3)), each in a fresh process: the median step time
of --repeats steps after two warm-up steps (palettized already: milestone 0), and the process's
resident high-water mark over the timed steps above its resident set before them (harness.py's
ResidentPeak), on --threads threads (default 1, steadier on a shared machine). Cases: "layer",
one 512x512x3x3 convolution at 8/8 (k = 256, d = 8) on a (1, 512, 8, 8) input; "digits", the
main job's DigitsCNN at 2 bits on a batch of 64.
"""
from __future__ import annotations

import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from harness import (  # noqa: E402
    ResidentPeak,
    machine,
    results_path,
    run_case,
    script_parser,
    serve_worker,
    utc_now_iso,
    write_json,
)

WARMUP_STEPS = 2
# coremltools' configurations of the speed cases (weight_threshold 0: every weight is clustered).
SPEED_CONFIGS = {
    "layer": {"global_config": {"n_bits": 8, "cluster_dim": 8, "weight_threshold": 0,
                                "lut_dtype": "f16"}},
    "digits": {"global_config": {"n_bits": 2, "weight_threshold": 0, "lut_dtype": "f16"}},
}
IMPLEMENTATIONS = ("coremltools", "dkm_kernels")


# -- sizes ----------------------------------------------------------------------------------------

def weight_file_bytes(mlpackage: str) -> int:
    return os.path.getsize(os.path.join(mlpackage, "Data", "com.apple.CoreML", "weights",
                                        "weight.bin"))


def package_bytes(mlpackage: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(mlpackage) for name in names)


def layout(dim: int) -> str:
    """The convolutions' vectors: along the output channels (Linear layers keep the flattened
    layout, whose vectors lie along their input features)."""
    return "output" if dim > 1 else "flat"


def measure_sizes(args) -> dict:
    import coremltools as ct
    import torch

    from dkm_kernels import cli, compress_model
    from dkm_kernels.export import export_bytes

    torch.manual_seed(args.seed)
    train_data, test_data = cli.load_digits_split(args.seed)
    float_model = cli.DigitsCNN()
    cli.train(float_model, train_data, args.epochs, 3e-3, args.seed)
    float_state = {k: v.clone() for k, v in float_model.state_dict().items()}
    example = torch.zeros(1, 1, 8, 8)
    folder = tempfile.mkdtemp(prefix="dkm_coreml_sizes_")
    try:
        dense_path = os.path.join(folder, "dense.mlpackage")
        traced = torch.jit.trace(float_model.eval(), example)
        ct.convert(traced, inputs=[ct.TensorType(shape=example.shape)],
                   minimum_deployment_target=ct.target.iOS18).save(dense_path)
        dense = {"weight_file_bytes": weight_file_bytes(dense_path),
                 "package_bytes": package_bytes(dense_path),
                 "float32_state_dict_bytes": sum(v.numel() * v.element_size()
                                                 for v in float_state.values()),
                 "test_accuracy": cli.accuracy(float_model, test_data)}
        rows = []
        for (bits, dim), quantization in itertools.product(cli._parse_configs(args.configs),
                                                            args.lut_quantization.split(",")):
            quantization = None if quantization == "none" else quantization
            model = cli.DigitsCNN()
            model.load_state_dict(float_state)
            compressor = compress_model(model, bits=bits, dim=dim, tau="auto",
                                        conv_config={"vector_axis": layout(dim)},
                                        skip_first_last=False, small_layer_threshold=0,
                                        seed=args.seed, target="coreml",
                                        lut_quantization=quantization)
            cli.train(compressor, train_data, args.dkm_epochs, 2e-3, args.seed, 64)
            export = compressor.export_compressed()
            export_path = os.path.join(folder, f"{bits}_{dim}_{quantization}.dkm.pt")
            compressor.save_compressed(export_path)
            path = os.path.join(folder, f"{bits}_{dim}_{quantization}.mlpackage")
            compressor.to_coreml(example, path)
            row = {"config": f"{bits}/{dim}",
                   "lut_quantization": quantization,
                   "conv_vector_axis": layout(dim),
                   "test_accuracy": cli.accuracy(compressor, test_data),
                   "palettized_weight_file_bytes": weight_file_bytes(path),
                   "palettized_package_bytes": package_bytes(path),
                   "export_tensor_bytes": export_bytes(export),
                   "export_file_bytes": os.path.getsize(export_path)}
            row["dense_over_palettized"] = (dense["weight_file_bytes"]
                                            / row["palettized_weight_file_bytes"])
            rows.append(row)
            print(f"{row['config']} ({quantization or 'float'} palettes): palettized "
                  f"{row['palettized_weight_file_bytes']} B, export "
                  f"{row['export_tensor_bytes']} B (file {row['export_file_bytes']} B), dense "
                  f"float16 {dense['weight_file_bytes']} B", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"dense_float16": dense, "palettized": rows, "epochs": args.epochs,
            "dkm_epochs": args.dkm_epochs, "seed": args.seed}


# -- speed ----------------------------------------------------------------------------------------

def _speed_worker(case: dict) -> dict:
    import torch
    from torch import nn

    from dkm_kernels import cli, compress_model, from_coremltools_config

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    if case["case"] == "layer":
        # Inside a Sequential: coremltools' palettizer leaves a root module unpalettized.
        model = nn.Sequential(nn.Conv2d(512, 512, 3, padding=1))
        inputs = torch.randn(1, 512, 8, 8)
    else:
        model = cli.DigitsCNN()
        inputs = torch.randn(64, 1, 8, 8)
    config = SPEED_CONFIGS[case["case"]]
    palettizer = None
    if case["impl"] == "coremltools":
        from coremltools.optimize.torch.palettization import DKMPalettizer, DKMPalettizerConfig

        palettizer = DKMPalettizer(model, DKMPalettizerConfig.from_dict(config))
        model = palettizer.prepare(inplace=True)
    else:
        model = compress_model(model, seed=0, backend=case["backend"],
                               **from_coremltools_config(config))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()
        if palettizer is not None:
            palettizer.step()

    if palettizer is not None:
        palettizer.step()  # milestone 0: palettization from the first timed step on
    for _ in range(WARMUP_STEPS):
        step()
    times = []
    with ResidentPeak() as peak:
        for _ in range(case["repeats"]):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return dict(case, step_s=statistics.median(times), step_times_s=times, **peak.fields())


def measure_speed(args) -> list[dict]:
    rows = []
    for name in args.cases.split(","):
        for impl in IMPLEMENTATIONS:
            case = dict(case=name, impl=impl, repeats=args.repeats, backend=args.backend,
                        threads=args.threads)
            print(f"measuring {name} with {impl} ...", flush=True)
            try:
                rows.append(run_case(__file__, case, args.case_timeout))
            except subprocess.TimeoutExpired:
                rows.append(dict(case, error=f"not done after {args.case_timeout} s "
                                             f"({WARMUP_STEPS} warm-up and {args.repeats} steps)"))
    for name in args.cases.split(","):
        theirs, ours = (next(r for r in rows if r["case"] == name and r["impl"] == impl)
                        for impl in IMPLEMENTATIONS)
        if "step_s" in ours and "error" in theirs:
            # Its steps are not timed one by one (its first includes its k-means initialisation):
            # only the whole run's bound is known.
            ours["coremltools_run_s"] = f"more than {args.case_timeout:.0f}"
        if "step_s" in theirs and "step_s" in ours:
            ours["speedup_vs_coremltools"] = theirs["step_s"] / ours["step_s"]
            ours["peak_ratio_vs_coremltools"] = theirs["peak_bytes"] / max(ours["peak_bytes"], 1)
    return rows


def main(argv=None) -> dict:
    parser = script_parser(__doc__, backend="cpu", repeats=3, out="")
    parser.add_argument("--part", choices=("sizes", "speed", "both"), default="both")
    parser.add_argument("--configs", default="1/1,2/1,3/1,4/4,4/8")
    parser.add_argument("--lut-quantization", default="none",
                        help="palettes per config, comma-separated: none (float), int8, uint8")
    parser.add_argument("--epochs", type=int, default=20, help="float training epochs")
    parser.add_argument("--dkm-epochs", type=int, default=8, help="DKM epochs per config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default="layer,digits")
    parser.add_argument("--case-timeout", type=float, default=1800,
                        help="seconds a speed worker may take (warm-up and timed steps)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the speed workers (1: steady on a shared machine)")
    args = parser.parse_args(argv)
    result = {"machine": machine(), "date": utc_now_iso()}
    if args.part in ("sizes", "both"):
        result["sizes"] = measure_sizes(args)
    if args.part in ("speed", "both"):
        result["speed"] = measure_speed(args)
        for row in result["speed"]:
            if "step_s" in row:
                extra = (f", {row['speedup_vs_coremltools']:.1f}x faster, "
                         f"{row['peak_ratio_vs_coremltools']:.1f}x less memory"
                         if "peak_ratio_vs_coremltools" in row else "")
                print(f"{row['case']:<7} {row['impl']:<12} step {row['step_s']:.3f} s, peak "
                      f"{row['peak_bytes'] / 2**20:,.0f} MiB{extra}")
            else:
                print(f"{row['case']:<7} {row['impl']:<12} {row.get('error')}")
    write_json(results_path(args.out or f"coreml_{args.part}.json"), result)
    return result


if __name__ == "__main__":
    if not serve_worker(_speed_worker):
        main()
