"""Row-sharded DKM on torch.distributed: bytes communicated per training step (counted), and the
op's time on 2 CPU processes against 1 (measured).

    python benchmarks/distributed.py                  # both; writes benchmarks/results/distributed.json
    python benchmarks/distributed.py --rows 4096 --repeats 1 --out /tmp/distributed.json   # quick check

Counted bytes, per training step, for every clustered weight of ResNet-50 at 8/8 (the paper's
small-layer rule: 8-bit scalar palettes below 10,000 elements) and of one LLaMA-7B decoder layer
at 4 bits (k = 16, d = 1; q, k, v, o 4096 x 4096, gate and up 11008 x 4096, down 4096 x 11008),
L = 5 iterations, float32 weights and sums, R ranks:

- this design, the op (`dkm(..., process_group=)`, rows stay on their rank): per forward
  iteration one all-reduce of k (d + 1) floats per group, per backward step one of k d (G_L, then
  one per iteration);
- this design at the model level (`compress_model(process_group=, shard_rows=True)`): the op's
  all-reduces, plus an all-gather of the clustered weight forward and a reduce-scatter of its
  gradient backward (M d floats each);
- all-gathering the distance matrix (as coremltools' distributed DKM does): per forward iteration
  an all-gather of the M x k float32 distances; the backward is not sharded (every rank
  backpropagates the whole problem), so it communicates nothing;
- all-gathering the weights: the whole weight gathered forward (M d floats), every rank clusters
  all of it, the gradient reduce-scattered backward.

`payload` is the size of the tensors the collectives produce (the all-reduced sums, the gathered
matrix); `sent per rank` is what each rank sends with ring algorithms: 2 (R - 1) / R of the payload
for an all-reduce, (R - 1) / R for an all-gather or a reduce-scatter. (FSDP2 moves each weight and
its gradient once more on its own, whichever design clusters it.)

Measured: forward + backward of the op (`cpu` backend, float32, tau = 2e-5 at trained-weight
scale, 5 iterations) on the 512x512x3x3 layer at 8/8 (M = 294,912, d = 8, k = 256): 1 process with
1 thread and with 2 threads, and 2 processes of 1 thread each holding M / 2 rows, joined by gloo
over loopback. Medians of --repeats runs after a warm-up; a run's time is the slowest rank's
wall time, and its CPU time the busiest rank's process CPU time (on a machine whose cores other
jobs hold, wall time includes waiting for a core; CPU time shows how the work divides).
"""
from __future__ import annotations

import os
import queue
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))  # this checkout's dkm_kernels, in the workers too
sys.path.insert(0, HERE)
from harness import (  # noqa: E402
    FLOAT32_BYTES,
    ITERATIONS,
    PAPER_TAU,
    machine,
    results_path,
    script_parser,
    trained_like_weights,
    write_json,
)
from resnet50_shapes import clustering_plan  # noqa: E402

LAYER = dict(m=512 * 512 * 3 * 3 // 8, d=8, k=256)
LLAMA_7B_LAYER = [("q_proj", (4096, 4096)), ("k_proj", (4096, 4096)), ("v_proj", (4096, 4096)),
                  ("o_proj", (4096, 4096)), ("gate_proj", (11008, 4096)),
                  ("up_proj", (11008, 4096)), ("down_proj", (4096, 11008))]
DESIGNS = ("op", "model_level", "gather_distances", "gather_weights")


def llama_plan(bits: int = 4, dim: int = 1) -> list[dict]:
    return [dict(name=name, shape=shape, numel=shape[0] * shape[1], d=dim, k=2**bits,
                 m=shape[0] * shape[1] // dim) for name, shape in LLAMA_7B_LAYER]


def collectives(m: int, d: int, k: int, iterations: int = ITERATIONS, groups: int = 1) -> dict:
    """Per design: [(kind, payload bytes)] of one training step of one weight."""
    sums = [("all_reduce", groups * k * (d + 1) * FLOAT32_BYTES)] * iterations
    gradient_sums = [("all_reduce", groups * k * d * FLOAT32_BYTES)] * (iterations + 1)
    weight = groups * m * d * FLOAT32_BYTES
    return {
        "op": sums + gradient_sums,
        "model_level": sums + gradient_sums + [("all_gather", weight), ("reduce_scatter", weight)],
        "gather_distances": [("all_gather", groups * m * k * FLOAT32_BYTES)] * iterations,
        "gather_weights": [("all_gather", weight), ("reduce_scatter", weight)],
    }


def sent_per_rank(kind: str, payload: int, ranks: int) -> float:
    """Bytes one rank sends in a ring collective producing `payload` bytes."""
    share = (ranks - 1) / ranks
    return (2 if kind == "all_reduce" else 1) * share * payload


def count(plan: list[dict], ranks: int) -> dict:
    totals = {design: {"payload_bytes": 0, "sent_per_rank_bytes": 0.0, "collectives": 0}
              for design in DESIGNS}
    for weight in plan:
        for design, calls in collectives(weight["m"], weight["d"], weight["k"]).items():
            totals[design]["payload_bytes"] += sum(payload for _, payload in calls)
            totals[design]["sent_per_rank_bytes"] += sum(sent_per_rank(kind, payload, ranks)
                                                         for kind, payload in calls)
            totals[design]["collectives"] += len(calls)
    return totals


# -- measured --------------------------------------------------------------------------------------

def _time_op(rank: int, world_size: int, store: str, rows: int, repeats: int, threads: int,
             results) -> None:
    import torch

    import dkm_kernels

    torch.set_num_threads(threads)
    group = None
    if world_size > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                             world_size=world_size)
        group = torch.distributed.group.WORLD
    gen = torch.Generator().manual_seed(0)
    weights = trained_like_weights((rows, LAYER["d"]), gen)
    centroids = dkm_kernels.random_rows(weights, LAYER["k"], generator=gen)
    upstream = torch.randn(weights.shape, generator=gen)
    mine = weights.tensor_split(world_size)[rank]
    mine_upstream = upstream.tensor_split(world_size)[rank]

    def once() -> tuple[float, float]:
        if group is not None:
            torch.distributed.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        w = mine.detach().requires_grad_(True)
        result = dkm_kernels.dkm(w, centroids, PAPER_TAU, ITERATIONS, 0.0, backend="cpu",
                                 process_group=group)
        result.weights.backward(mine_upstream)
        return time.perf_counter() - start, time.process_time() - cpu_start

    once()  # warm-up
    times = [once() for _ in range(repeats)]
    results.put((rank, times))
    if group is not None:
        torch.distributed.destroy_process_group()


def measure(world_size: int, threads: int, rows: int, repeats: int) -> dict:
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as directory:
        store = os.path.join(directory, "store")
        processes = [context.Process(target=_time_op, args=(rank, world_size, store, rows,
                                                            repeats, threads, results))
                     for rank in range(world_size)]
        for process in processes:
            process.start()
        per_rank = {}
        while len(per_rank) < world_size:
            try:
                rank, times = results.get(timeout=5)
                per_rank[rank] = times
            except queue.Empty:
                if any(process.exitcode not in (None, 0) for process in processes):
                    raise RuntimeError("a worker failed (its traceback is above)") from None
        for process in processes:
            process.join()
    slowest = [max(times[i][0] for times in per_rank.values()) for i in range(repeats)]
    cpu = [max(times[i][1] for times in per_rank.values()) for i in range(repeats)]
    return dict(processes=world_size, threads_per_process=threads, rows=rows,
                rows_per_process=-(-rows // world_size),
                forward_backward_s=statistics.median(slowest), runs_s=slowest,
                cpu_s_per_process=statistics.median(cpu))


def main(argv=None) -> dict:
    parser = script_parser(__doc__, repeats=5, out="distributed.json")
    parser.add_argument("--rows", type=int, default=LAYER["m"],
                        help="M of the measured layer, for a quick check at a smaller size")
    parser.add_argument("--ranks", type=int, default=8, help="R for the counted bytes")
    args = parser.parse_args(argv)

    counted = {}
    for model, plan in (("resnet50_8/8", clustering_plan(8, 8)), ("llama7b_layer_4bit",
                                                                  llama_plan(4, 1))):
        counted[model] = dict(weights=len(plan), elements=sum(w["numel"] for w in plan),
                              ranks=args.ranks, **count(plan, args.ranks))
        print(f"\n{model}: {len(plan)} weights, {counted[model]['elements']:,} elements, "
              f"R = {args.ranks}, {ITERATIONS} iterations, per training step")
        print(f"{'design':<18} {'collectives':>11} {'payload':>14} {'sent per rank':>14}")
        for design in DESIGNS:
            row = counted[model][design]
            print(f"{design:<18} {row['collectives']:>11} {row['payload_bytes'] / 2**20:>10.3f} MiB"
                  f" {row['sent_per_rank_bytes'] / 2**20:>10.3f} MiB")

    measured = []
    for world_size, threads in ((1, 1), (1, 2), (2, 1)):
        print(f"\nmeasuring {world_size} process(es) x {threads} thread(s) ...", flush=True)
        measured.append(measure(world_size, threads, args.rows, args.repeats))
    base = measured[0]["forward_backward_s"]
    print(f"\n512x512x3x3 at 8/8, M = {args.rows:,}, cpu backend, forward + backward")
    for row in measured:
        row["speedup_vs_1x1"] = base / row["forward_backward_s"]
        print(f"{row['processes']} process(es) x {row['threads_per_process']} thread(s): "
              f"{row['forward_backward_s']:.3f} s  ({row['speedup_vs_1x1']:.2f}x), CPU time of "
              f"the busiest process {row['cpu_s_per_process']:.3f} s")
    import torch

    from dkm_kernels.backends import cpu
    info = machine()
    info.update(cpu_backend_isa=cpu.isa(), load_average_1min=os.getloadavg()[0],
                note="2-core machine shared with other jobs while measuring")
    payload = dict(benchmark="distributed", iterations=ITERATIONS, layer=dict(LAYER, m=args.rows),
                   counted=counted, measured=measured, machine=info, torch=torch.__version__)
    write_json(results_path(args.out), payload)
    return payload


if __name__ == "__main__":
    main()
