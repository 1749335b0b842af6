"""GPU benchmark of the DKM backends on ResNet-50 layer shapes: time and peak memory.

One command on a CUDA machine:

    python benchmarks/gpu_bench.py

measures forward, backward and forward+backward (triton.testing.do_bench, median) and the peak of
torch.cuda.max_memory_allocated for `reference`, `torch` and `triton` (atomic and deterministic
reductions) in the same run, so that ratios hold; prints a markdown table and writes JSON to
benchmarks/results/gpu_<device>_<date>.json with the device, versions, commit and date.

`--dry-run` needs no GPU: it lists the cases, the reference's predicted memory and the counted floor.
`--compile-check` needs no GPU either: it compiles the Triton kernels of each case for sm_90 and
prints ptxas's registers and spills per kernel.

The floor of a case is counted: exponentials, multiply-adds and bytes of W per pass and the number
of passes (harness.counted_work, harness.passes_per_direction), at the card's rates measured at the
start of the same run (measured_rates; --dry-run uses an H100 SXM's datasheet rates,
harness.H100_SXM); the floor is the largest of the three times (harness.time_floor).
`--resnet50` times the whole ResNet-50 8/8 clustering instead, one op call per layer and all
layers in one `dkm_many` call; for triton it records the passes class, the launches per pass and
(one call) CUDA-graph captures of the forward's iterations and of the whole forward+backward, with
eager and replay times (docs/design.md §12).
The reference's predicted memory, and the cap that skips it, is harness.naive_peak_bytes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from resnet50_shapes import clustering_plan  # noqa: E402
from harness import (  # noqa: E402
    GPU_REFERENCE_CAP_GIB,
    H100_SXM,
    ITERATIONS,
    PAPER_TAU,
    CudaPeak,
    Rates,
    counted_work,
    gpu_machine,
    naive_peak_bytes,
    passes_per_direction,
    results_path,
    time_floor,
    trained_like_weights,
    write_json,
)

# name, M rows, d, k: M = 294,912 is ResNet-50's 512x512x3x3 convolution at d = 8 (2,359,296
# weights), M = 12,800 a small layer; every k of 2, 4, 8 and 12 bits, at d = 1 and d = 8.
CASES = [(f"M={m} d{d} k{k}", m, d, k)
         for m in (294_912, 12_800) for d in (8, 1) for k in (256, 4, 16, 4096)]

BACKENDS = ("reference", "torch", "triton", "triton-deterministic")

# The target of --compile-check: an H100 (compute capability 9.0), 32 threads a warp.
SM90 = (90, 32)


def counted_floor(m: int, d: int, k: int, passes: int, rates: Rates = H100_SXM) -> dict:
    work = counted_work(m, d, k, passes)
    return {**work, **time_floor(work, rates)}


def floors(m: int, d: int, k: int, iterations: int, rates: Rates = H100_SXM) -> dict:
    passes = passes_per_direction(iterations)
    return {
        "forward": counted_floor(m, d, k, passes, rates),
        "backward": counted_floor(m, d, k, passes, rates),
        "forward+backward": counted_floor(m, d, k, 2 * passes, rates),
    }


# The self-check runs the kernels in Triton's interpreter; the compile check compiles them (the
# interpreter must be off before triton is imported).
if not torch.cuda.is_available() and "--compile-check" not in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
else:
    @triton.jit
    def _exp2_chain_kernel(x_ptr, out_ptr, REPEATS: tl.constexpr, BLOCK: tl.constexpr):
        """REPEATS exponentials per loaded value, each feeding the next (values stay in (0, 1])."""
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offsets)
        total = tl.zeros_like(x)
        for _ in tl.static_range(REPEATS):
            x = tl.exp2(x * -0.5)
            total += x
        tl.store(out_ptr + offsets, total)


def exp_rate_launch(x, out, repeats: int = 64, block: int = 1024):
    """One launch of the exponential-rate kernel over x (its numel a multiple of `block`)."""
    _exp2_chain_kernel[(x.numel() // block,)](x, out, REPEATS=repeats, BLOCK=block)


def measured_rates(do_bench, device, matmul_n: int = 8192, exp_values: int = 1 << 24,
                   copy_values: int = 1 << 28) -> dict:
    """This card's rates, measured in this run (medians of do_bench): float32 multiply-adds from
    an 8192^3 matrix product without TF32, exponentials from a Triton kernel that takes 64 exp2
    per loaded value, bytes from a 1 GiB device-to-device copy (read plus written)."""
    n = matmul_n
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        matmul_ms = do_bench(lambda: a @ b, return_mode="median")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    del a, b
    x = torch.rand(exp_values, device=device)
    out = torch.empty_like(x)
    exp_ms = do_bench(lambda: exp_rate_launch(x, out), return_mode="median")
    del x, out
    src = torch.rand(copy_values, device=device)
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"fma_per_s": n**3 / (matmul_ms * 1e-3),
            "exp_per_s": 64 * exp_values / (exp_ms * 1e-3),
            "bytes_per_s": 2 * 4 * copy_values / (copy_ms * 1e-3)}


def dry_run(cases, iterations: int, cap_bytes: int) -> None:
    print(f"{len(cases)} cases, L = {iterations} iterations, tau = {PAPER_TAU}; floors on an H100 "
          f"({H100_SXM.fma_per_s / 1e12:.1f}e12 FMA/s, {H100_SXM.exp_per_s / 1e12:.2f}e12 exp/s, "
          f"{H100_SXM.bytes_per_s / 1e12:.2f} TB/s)\n")
    print("| case | M | d | k | reference memory (predicted) | fwd floor | bwd floor | fwd+bwd floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m, d, k in cases:
        predicted = naive_peak_bytes(m, k, iterations)
        note = "" if predicted <= cap_bytes else " (skipped: over cap)"
        f = floors(m, d, k, iterations)
        print(f"| {name} | {m} | {d} | {k} | {predicted / 2**30:.1f} GiB{note} | "
              f"{f['forward']['floor_s'] * 1e3:.3f} ms | {f['backward']['floor_s'] * 1e3:.3f} ms | "
              f"{f['forward+backward']['floor_s'] * 1e3:.3f} ms |")


def compile_check(cases) -> None:
    """Compile every kernel of every case's launch plan for sm_90 (no GPU needed) and print what
    ptxas reports: registers per thread and spilled bytes."""
    os.environ.pop("TRITON_INTERPRET", None)  # must be off before the kernels are defined
    import glob
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dkm_kernels.backends import triton_kernels as tk

    # Triton ships ptxas builds for several PTX versions: use the first that takes its PTX.
    ptxas_builds = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends",
                                                 "nvidia", "bin", "ptxas*"))) or ["ptxas"]
    # The tables are int64, `active` int32, every other pointer fp32; scalars are int32 but the
    # addresses a0.. of _store_addresses_kernel, int64.
    int_pointers = {"active_ptr": "*i32", "items_ptr": "*i64", "segments_ptr": "*i64",
                    "table_ptr": "*i64"}

    def pointer_type(name):
        return "*i64" if name.endswith("_addrs_ptr") else int_pointers.get(name, "*fp32")

    def report(kernel, constexprs, num_warps):
        signature = {name: "constexpr" if name in constexprs else
                     pointer_type(name) if name.endswith("_ptr") else
                     "i64" if name[0] == "a" and name[1:].isdigit() else "i32"
                     for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", *SM90),
                                  options={"num_warps": num_warps, "num_stages": 1})
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "kernel.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            for ptxas in ptxas_builds:
                result = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", ptx + ".cubin"],
                                        capture_output=True, text=True)
                if result.returncode == 0:
                    break
        usage = [line.split("info    : ")[-1] for line in result.stderr.splitlines()
                 if "registers" in line or "spill" in line]
        blocks = " ".join(f"{name}={constexprs[name]:3d}" for name in ("BLOCK_M", "BLOCK_K")
                          if name in constexprs)
        print(f"  {kernel.__name__:24s} {blocks} warps={num_warps}: {'; '.join(usage)}")

    for name, m, d, k in cases:
        print(name)
        for backward in (False, True):
            plan = tk._Blocks(k, d, tk.BACKWARD_SINGLE_BLOCK_TILE if backward
                              else tk.SINGLE_BLOCK_TILE)
            blocks = dict(D=d, BLOCK_D=plan.block_d, BLOCK_M=plan.block_m, BLOCK_K=plan.block_k)
            flags = dict(SINGLE_BLOCK=plan.single_block, ATOMIC=False)
            if backward:  # the first backward pass, with G~: the most registers
                flags["HAS_GRAD_OUT"] = True
            kernel = tk._backward_kernel if backward else tk._attention_sums_kernel
            report(kernel, {**blocks, **flags}, plan.num_warps)
            if not backward:
                out = plan.output()
                report(tk._output_kernel, dict(blocks, BLOCK_M=out.block_m,
                                               BLOCK_K=out.block_k), out.num_warps)
    report(tk._reduce_slots_kernel, {"BLOCK": tk.REDUCE_BLOCK}, 4)
    report(tk._store_addresses_kernel, {}, 1)


def measure(backend: str, weights, centroids, iterations: int, do_bench,
            device=torch.device("cuda")) -> dict:
    """Median times of forward, backward, forward+backward and the peak memory of one
    forward+backward above what was allocated before (inputs included in the baseline)."""
    import dkm_kernels

    name = "triton" if backend.startswith("triton") else backend
    deterministic = backend == "triton-deterministic"
    w = weights.detach().clone().requires_grad_(True)
    grad = torch.randn_like(w)

    def forward():
        return dkm_kernels.dkm(w, centroids, PAPER_TAU, iterations, 0.0, backend=name,
                               deterministic=deterministic).weights

    def forward_backward():
        forward().backward(grad)

    forward_backward()  # compile and warm up
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    w.grad = None
    forward_ms = do_bench(forward, return_mode="median")
    out = forward()
    backward_ms = do_bench(lambda: out.backward(grad, retain_graph=True), grad_to_none=[w],
                           return_mode="median")
    del out
    both_ms = do_bench(forward_backward, grad_to_none=[w], return_mode="median")

    w.grad = None
    with CudaPeak() if cuda else contextlib.nullcontext() as peak:
        forward_backward()
    w.grad = None
    return {"forward_ms": forward_ms, "backward_ms": backward_ms,
            "forward+backward_ms": both_ms, "peak_bytes": peak.bytes if cuda else 0}


@contextlib.contextmanager
def counted_launches():
    """Counts the triton backend's kernel launches by kernel name while the block runs."""
    from dkm_kernels.backends import triton_kernels as tk

    counts: dict[str, int] = {}
    launch = tk._launch

    def counted(kernel, *args, **kwargs):
        counts[kernel.__name__] = counts.get(kernel.__name__, 0) + 1
        return launch(kernel, *args, **kwargs)
    tk._launch = counted
    try:
        yield counts
    finally:
        tk._launch = launch


def _captured(fn, warmups: int):
    """`fn` captured in a CUDA graph after `warmups` calls on a side stream (as torch.cuda.graph
    asks), and replayed once: (the graph, the outputs its replays write)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph, static


def graph_capture(params, centroids, iterations: int, deterministic: bool, do_bench) -> dict:
    """The forward's iterations of the ragged triton passes (every layer in one launch per kernel
    variant and pass, and the centroid update: no host sync in between) captured in one CUDA
    graph: whether capture works, the replay against eager and both times. A failure is
    reported, not raised. Without CUDA the loop runs eagerly once (the self-check)."""
    from dkm_kernels import recurrence
    from dkm_kernels.backends import triton_kernels as tk
    from dkm_kernels.many import Layout

    weights = [w.detach()[None] for w in params]
    layout = Layout.of(weights, [c.shape[0] for c in centroids])
    passes = tk.RaggedPasses(weights, layout, [PAPER_TAU] * len(weights), deterministic)
    start = layout.pack([c[None].float() for c in centroids])
    active = torch.ones(layout.segments, dtype=torch.bool, device=start.device)

    def loop():
        c = start
        for _ in range(iterations):
            sums, mass = passes.attention_sums(passes.weights, c, active)
            c = torch.where(recurrence.has_mass(mass).unsqueeze(-1),
                            sums / mass.clamp_min(recurrence.MIN_MASS).unsqueeze(-1), c)
        return c

    result = {"buckets": len(passes.buckets), "segments": layout.segments}
    try:
        eager = loop()  # compiles the kernels outside the capture
        result["eager_ms"] = do_bench(loop, return_mode="median")
        if start.device.type != "cuda":
            result.update(captured=None, reason="no CUDA device")
            return result
        graph, captured = _captured(loop, warmups=2)
        result.update(captured=True, replay_ms=do_bench(graph.replay, return_mode="median"),
                      replay_equals_eager=bool(torch.equal(captured, eager)) if deterministic
                      else bool(torch.allclose(captured, eager, rtol=1e-5, atol=1e-6)))
    except Exception as error:  # noqa: BLE001 (the session goes on; the failure is the result)
        result.update(captured=False, error=f"{type(error).__name__}: {str(error)[:300]}")
    return result


def call_capture(params, centroids, upstream, iterations: int, deterministic: bool,
                 do_bench) -> dict:
    """A whole forward+backward of every layer in one `dkm_many` call (triton) captured in one
    CUDA graph (docs/design.md §12): static inputs (weights, centroids, upstream gradients), an
    eager call first (it compiles the kernels and builds the tables), the warm-up on a side stream
    as torch.cuda.graph asks, capture, replay. Reports whether capture works, the replay's values,
    centroids, iterations and weight gradients against the eager call's (bit for bit in
    deterministic mode), and eager and replay times; a failure is reported, not raised. Without
    CUDA only the eager call runs (the self-check)."""
    import dkm_kernels

    leaves = [w.detach().clone().requires_grad_(True) for w in params]

    def step():
        results = dkm_kernels.dkm_many(
            [(w, c, PAPER_TAU, iterations, 0.0) for w, c in zip(leaves, centroids)],
            backend="triton", deterministic=deterministic)
        grads = torch.autograd.grad([r.weights for r in results], leaves, upstream)
        return ([r.weights.detach() for r in results] + [r.centroids for r in results]
                + [r.iterations for r in results] + list(grads))

    result = {"layers": len(leaves)}
    try:
        eager = [t.clone() for t in step()]
        result["eager_ms"] = do_bench(step, return_mode="median")
        if leaves[0].device.type != "cuda":
            result.update(captured=None, reason="no CUDA device")
            return result
        graph, static = _captured(step, warmups=3)
        if deterministic:
            equal = all(torch.equal(a, b) for a, b in zip(static, eager))
        else:  # atomics: the order of the additions, and so the last bits, differ run to run
            equal = all(torch.equal(a, b) if not a.is_floating_point()
                        else torch.allclose(a, b, rtol=1e-4, atol=1e-5)
                        for a, b in zip(static, eager))
        result.update(captured=True, replay_equals_eager=bool(equal),
                      replay_ms=do_bench(graph.replay, return_mode="median"))
        # Replays read the inputs in place: new weights give the eager call's new results.
        with torch.no_grad():
            for leaf in leaves:
                leaf.mul_(1.01)
        graph.replay()
        fresh = step()
        torch.cuda.synchronize()
        result["replay_follows_new_inputs"] = bool(all(
            torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)
            for a, b in zip(static, fresh)))
    except Exception as error:  # noqa: BLE001 (the session goes on; the failure is the result)
        result.update(captured=False, error=f"{type(error).__name__}: {str(error)[:300]}")
    return result


def resnet50_clustering(backend: str, iterations: int, do_bench, rates: Rates,
                        device=torch.device("cuda"), layers: int | None = None,
                        one_call: bool = False, rows: int | None = None) -> dict:
    """Every ResNet-50 weight at cv:8/8 fc:8/8 (benchmarks/resnet50_shapes.py), one op call per
    layer, or all of them in one `dkm_many` call (`one_call`, docs/design.md §12): all forwards,
    then one backward through all of them; median time, peak memory and the floor summed over
    the layers. For triton also the passes class that runs the call, its launches per pass and,
    for one call, CUDA-graph captures of the forward's iterations (graph_capture) and of the whole
    forward+backward (call_capture). `rows` caps every layer's rows and k (the self-check's tiny
    sizes)."""
    import dkm_kernels

    name = "triton" if backend.startswith("triton") else backend
    deterministic = backend == "triton-deterministic"
    gen = torch.Generator(device=device).manual_seed(0)
    plan = [dict(layer, m=min(layer["m"], rows), k=min(layer["k"], rows)) if rows else layer
            for layer in clustering_plan()[:layers]]
    params, centroids, upstream = [], [], []
    for layer in plan:
        w = trained_like_weights((layer["m"], layer["d"]), gen, device)
        centroids.append(dkm_kernels.random_rows(w, layer["k"], generator=gen))
        params.append(w.requires_grad_(True))
        upstream.append(torch.randn(w.shape, device=device, generator=gen))

    def forward_backward():
        if one_call:
            outs = [r.weights for r in dkm_kernels.dkm_many(
                [(w, c, PAPER_TAU, iterations, 0.0) for w, c in zip(params, centroids)],
                backend=name, deterministic=deterministic)]
        else:
            outs = [dkm_kernels.dkm(w, c, PAPER_TAU, iterations, 0.0, backend=name,
                                    deterministic=deterministic).weights
                    for w, c in zip(params, centroids)]
        torch.autograd.backward(outs, upstream)

    extra = {}
    if name == "triton":
        ragged = dkm_kernels.backends.ragged_passes_class(name, device, params[0].dtype)
        extra["passes"] = ("per problem" if not one_call or ragged is None
                           else f"{ragged.__module__}.{ragged.__qualname__}")
        with counted_launches() as counts:
            forward_backward()  # also compiles and warms up
        # attention-sums passes: L forward, one backward (G_L)
        extra["launches"] = dict(counts)
        extra["launches_per_pass"] = counts.get("_attention_sums_kernel", 0) / (iterations + 1)
    forward_backward()  # compile and warm up
    both_ms = do_bench(forward_backward, grad_to_none=params, return_mode="median")
    with (CudaPeak() if device.type == "cuda" else contextlib.nullcontext()) as peak:
        forward_backward()
    if name == "triton" and one_call:
        extra["cuda_graph"] = graph_capture(params, centroids, iterations, deterministic, do_bench)
        extra["cuda_graph_call"] = call_capture(params, centroids, upstream, iterations,
                                                deterministic, do_bench)
    floor_s = sum(floors(layer["m"], layer["d"], layer["k"], iterations, rates)
                  ["forward+backward"]["floor_s"] for layer in plan)
    return {"backend": backend, "layers": len(plan), "one_call": one_call,
            "forward+backward_ms": both_ms,
            "peak_bytes": peak.bytes if peak else None, "floor_ms": floor_s * 1e3,
            "x_floor": both_ms / (floor_s * 1e3), **extra}


def _time_once(fn, grad_to_none=None, return_mode="median") -> float:
    """do_bench's interface, one untimed call and one timed one: the self-check's stand-in."""
    import time

    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def self_check(iterations: int) -> int:
    """Every path of a GPU run on the CPU at tiny sizes; the Triton kernels in the interpreter."""
    device = torch.device("cpu")
    rates = measured_rates(_time_once, device, matmul_n=64, exp_values=1 << 12,
                           copy_values=1 << 12)
    print("rates", rates)
    gen = torch.Generator().manual_seed(0)
    weights = trained_like_weights((64, 2), gen)
    import dkm_kernels

    centroids = dkm_kernels.kmeans_plus_plus(weights, 4, generator=gen)
    rows = []
    for backend in BACKENDS:
        row = {"case": "self-check", "M": 64, "d": 2, "k": 4, "backend": backend,
               "floors": floors(64, 2, 4, iterations, Rates(**rates))}
        row.update(measure(backend, weights, centroids, iterations, _time_once, device))
        rows.append(row)
    print(markdown_table(rows))
    for backend in ("torch", "triton", "triton-deterministic"):
        for one_call in (False, True):  # layers of d = 1 and d = 8: two kernel variants
            print(resnet50_clustering(backend, iterations, _time_once, Rates(**rates), device,
                                      layers=3, one_call=one_call, rows=32))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="list cases, predicted reference memory and floors; needs no GPU")
    parser.add_argument("--compile-check", action="store_true",
                        help="compile the kernels for sm_90 and print registers/spills; no GPU")
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--reference-cap-gb", type=float, default=GPU_REFERENCE_CAP_GIB,
                        help="skip the reference where its predicted memory is above this")
    parser.add_argument("--cases", default="", help="only cases whose name contains this")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--self-check", action="store_true",
                        help="run every GPU code path once on the CPU at tiny sizes (Triton "
                             "interpreted): catches errors before a GPU call; times mean nothing")
    parser.add_argument("--resnet50", action="store_true",
                        help="the whole ResNet-50 8/8 clustering, one op call per layer")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)

    cases = [c for c in CASES if args.cases in c[0]]
    cap_bytes = int(args.reference_cap_gb * 2**30)
    if args.dry_run:
        dry_run(cases, args.iterations, cap_bytes)
        return 0
    if args.compile_check:
        compile_check(cases)
        return 0
    if args.self_check:
        return self_check(args.iterations)
    if not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to list the cases", file=sys.stderr)
        return 1

    from triton.testing import do_bench

    import dkm_kernels

    backends = [b for b in args.backends.split(",") if b]
    device = torch.device("cuda")
    rates = measured_rates(do_bench, device)
    print("measured: " + ", ".join(f"{key} {value:.3g}" for key, value in rates.items()))
    measured = Rates(**rates)
    record = {**gpu_machine(device), "tau": PAPER_TAU, "iterations": args.iterations,
              "measured_rates": rates, "assumed_h100": dataclasses.asdict(H100_SXM)}
    stamp = datetime.datetime.fromisoformat(record["date"]).strftime("%Y%m%d-%H%M%S")
    if args.resnet50:
        rows = []
        for backend in backends:
            if backend == "reference":
                continue  # 19 GB and minutes per step: docs/design.md §2 measured it once
            for one_call in (False, True):
                rows.append(resnet50_clustering(backend, args.iterations, do_bench, measured,
                                                one_call=one_call))
                print(rows[-1], flush=True)
        record["resnet50_clustering"] = rows
        write_json(args.out or results_path(f"gpu_resnet50_{_slug(record['device'])}_{stamp}.json"),
                   record)
        return 0
    rows = []
    for name, m, d, k in cases:
        gen = torch.Generator(device=device).manual_seed(0)
        weights = trained_like_weights((m, d), gen, device)
        centroids = dkm_kernels.kmeans_plus_plus(weights, k, generator=gen)
        case_floors = floors(m, d, k, args.iterations, measured)
        for backend in backends:
            row = {"case": name, "M": m, "d": d, "k": k, "backend": backend,
                   "iterations": args.iterations, "floors": case_floors}
            predicted = naive_peak_bytes(m, k, args.iterations)
            if backend == "reference" and predicted > cap_bytes:
                row["skipped"] = (f"predicted memory {predicted / 2**30:.1f} GiB is above the "
                                  f"cap of {args.reference_cap_gb} GiB")
            else:
                try:
                    row.update(measure(backend, weights, centroids, args.iterations, do_bench))
                except torch.cuda.OutOfMemoryError as error:
                    row["skipped"] = f"out of memory: {str(error).splitlines()[0]}"
                    torch.cuda.empty_cache()
            rows.append(row)
            print(_format_row(row), flush=True)
        del weights, centroids
        torch.cuda.empty_cache()

    record["results"] = rows
    print()
    print(markdown_table(rows))
    print()
    write_json(args.out or results_path(f"gpu_{_slug(record['device'])}_{stamp}.json"), record)
    return 0


def _slug(text: str) -> str:
    return "".join(ch.lower() if ch.isalnum() else "-" for ch in text).strip("-")


def _format_row(row: dict) -> str:
    if "skipped" in row:
        return f"{row['case']:24s} {row['backend']:22s} skipped: {row['skipped']}"
    return (f"{row['case']:24s} {row['backend']:22s} fwd {row['forward_ms']:9.3f} ms  "
            f"bwd {row['backward_ms']:9.3f} ms  fwd+bwd {row['forward+backward_ms']:9.3f} ms  "
            f"peak {row['peak_bytes'] / 2**20:9.1f} MiB")


def markdown_table(rows) -> str:
    lines = ["| case | backend | fwd ms | bwd ms | fwd+bwd ms | floor fwd+bwd ms | x floor | "
             "peak MiB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        floor_ms = row["floors"]["forward+backward"]["floor_s"] * 1e3
        if "skipped" in row:
            lines.append(f"| {row['case']} | {row['backend']} | skipped: {row['skipped']} "
                         f"| | | {floor_ms:.3f} | | |")
            continue
        ratio = row["forward+backward_ms"] / floor_ms if floor_ms > 0 else math.nan
        lines.append(f"| {row['case']} | {row['backend']} | {row['forward_ms']:.3f} | "
                     f"{row['backward_ms']:.3f} | {row['forward+backward_ms']:.3f} | "
                     f"{floor_ms:.3f} | {ratio:.1f} | {row['peak_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
