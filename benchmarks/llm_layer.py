"""DKM at LLM scale on the CPU: bfloat16 weights, scalar palettes (d = 1), uniquified or not.

    python benchmarks/llm_layer.py                      # all parts, writes benchmarks/results/llm_layer.json
    python benchmarks/llm_layer.py --parts projection   # one 4096 x 4096 projection only
    python benchmarks/llm_layer.py --rows 65536 --repeats 1 --out /tmp/llm.json   # a quick check

Parts:
- projection: one 4096 x 4096 weight at 4 bits (k = 16), 5 iterations, tau = 2e-5, forward and
  backward: bfloat16 uniquified (docs/design.md §10), bfloat16 not uniquified (the fused `cpu`
  backend), and float32 holding the same values (`cpu`). The naive reference cannot run at this
  size: its memory is counted (harness.naive_attention_bytes / naive_peak_bytes).
- decoder: the weights of one LLaMA-7B decoder layer (q, k, v, o: 4096 x 4096; gate, up:
  11008 x 4096; down: 4096 x 11008; 202M weights) at 3 and 4 bits, uniquified; one palette per
  weight, so a weight's cost depends only on its size and the layer is 4 cases of 16.8M weights
  and 3 of 45.1M. With --plain-decoder the 45.1M case also runs not uniquified (minutes).
  The projected cost per step of LLaMA-7B adds 32 such layers and the two 32000 x 4096
  embeddings, scaled by size from the 45.1M case.
- model: a small LLaMA-configuration model (transformers) in bfloat16 trained a few steps end to
  end with 4-bit DKM on every Linear, against the same model uncompressed (skipped without
  transformers).

Every case runs in a fresh process (benchmarks/harness.py: timing medians after a warm-up, peak =
resident high-water mark above the inputs). Ratios compare cases of the same run.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    ITERATIONS,
    PAPER_TAU,
    ResidentPeak,
    machine,
    median_times,
    mib,
    naive_attention_bytes,
    naive_peak_bytes,
    results_path,
    run_case,
    script_parser,
    serve_worker,
    time_forward_backward,
    trained_like_weights,
    write_json,
)

PROJECTION = 4096 * 4096
DECODER = {"q, k, v, o (4096 x 4096)": (4096 * 4096, 4), "gate, up, down (11008 x 4096)": (11008 * 4096, 3)}
LLAMA_7B_LAYERS = 32
LLAMA_7B_EMBEDDINGS = 2 * 32000 * 4096  # embed_tokens and lm_head (not tied)


def measure(case: dict, timeout: float = 3600) -> dict:
    return run_case(__file__, case, timeout)


def _case_worker(case: dict) -> dict:
    import torch

    import dkm_kernels

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    if case["kind"] == "model":
        return _model_worker(case)
    gen = torch.Generator().manual_seed(0)
    values = trained_like_weights((case["m"], 1), gen).to(torch.bfloat16)
    weights = values.to(getattr(torch, case["dtype"]))  # float32: the same values
    centroids = dkm_kernels.random_rows(values, case["k"], generator=gen)
    upstream = torch.randn(weights.shape, generator=gen).to(weights.dtype)

    def once():
        w = weights.detach().requires_grad_(True)
        timing, result = time_forward_backward(
            lambda: dkm_kernels.dkm(w, centroids, PAPER_TAU, ITERATIONS, 0.0,
                                    backend=case["backend"], uniquify=case["uniquify"]),
            lambda result: result.weights.backward(upstream))
        return timing, int(result.iterations)

    once()  # warm-up
    with ResidentPeak() as peak:
        runs = [once() for _ in range(case["repeats"])]
    distinct = dkm_kernels.unique.distinct(values.view(1, -1, 1)).values.shape[1]
    return dict(case, **median_times(t for t, _ in runs), iterations=runs[0][1],
                distinct_values=distinct, **peak.fields(), threads_used=torch.get_num_threads())


def _model_worker(case: dict) -> dict:
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import dkm_kernels

    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.loss_type = "ForCausalLM"
    if case["compressed"]:
        compressor = dkm_kernels.compress_model(model, bits=4, skip_first_last=False,
                                                small_layer_threshold=0, seed=0,
                                                uniquify=case["uniquify"], progress=False)
    model.to(torch.bfloat16).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    ids = torch.randint(config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))

    def step():
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return loss

    step()  # warm-up (and the centroids' first step)
    times = []
    with ResidentPeak() as peak:
        for _ in range(case["repeats"]):
            start = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    result = dict(case, step_s=sorted(times)[len(times) // 2], loss=float(loss), params=params,
                  **peak.fields(), threads_used=torch.get_num_threads())
    if case["compressed"]:
        result["clustered_weights"] = sum(layer.n_vectors for layer in
                                          compressor.dkm_layers.values())
    return result


def dkm_case(m, bits, dtype, uniquify, args, backend="auto"):
    return dict(kind="dkm", m=m, k=2**bits, bits=bits, dtype=dtype, uniquify=uniquify,
                backend=backend, repeats=args.repeats, threads=args.threads)


def row_text(label, r):
    if "forward_s" not in r:
        return f"{label:<44} {r.get('error', 'skipped')}"
    return (f"{label:<44} {r['forward_s']:>8.2f}s {r['backward_s']:>8.2f}s "
            f"{r['forward_backward_s']:>8.2f}s {mib(r['peak_bytes']):>11} "
            f"{r['peak_bytes'] / r['m']:>7.2f}")


HEADER = f"{'case':<44} {'forward':>9} {'backward':>9} {'fwd+bwd':>9} {'peak':>11} {'B/weight':>8}"


def projection_part(args, m):
    cases = {"bfloat16, uniquified": dkm_case(m, 4, "bfloat16", True, args),
             "bfloat16, not uniquified (cpu)": dkm_case(m, 4, "bfloat16", False, args, "cpu"),
             "float32, same values (cpu)": dkm_case(m, 4, "float32", False, args, "cpu")}
    rows = {}
    for label, case in cases.items():
        print(f"measuring {label} ...", flush=True)
        rows[label] = measure(case)
    print(f"\n{m:,} weights (4096 x 4096 at full size), 4 bits (k = 16), d = 1, {ITERATIONS} "
          f"iterations, threads={args.threads}")
    print(HEADER)
    for label, r in rows.items():
        print(row_text(label, r))
    unique, plain, fp32 = rows.values()
    summary = {}
    if all("forward_s" in r for r in rows.values()):
        summary = dict(
            uniquified_speedup_vs_float32=fp32["forward_backward_s"] / unique["forward_backward_s"],
            uniquified_speedup_vs_bfloat16=plain["forward_backward_s"] / unique["forward_backward_s"],
            bfloat16_vs_float32=fp32["forward_backward_s"] / plain["forward_backward_s"])
        print(f"uniquified: {summary['uniquified_speedup_vs_float32']:.1f}x faster than float32, "
              f"{summary['uniquified_speedup_vs_bfloat16']:.1f}x than bfloat16 not uniquified")
    naive = dict(attention_bytes=naive_attention_bytes(m, 16), peak_bytes=naive_peak_bytes(m, 16))
    print(f"naive reference (not run): keeps {mib(naive['attention_bytes'])} of attention for "
          f"backward, predicted peak {mib(naive['peak_bytes'])}\n")
    return dict(rows=[dict(label=label, **r) for label, r in rows.items()], summary=summary,
                naive_reference=naive)


def decoder_part(args, scale):
    results = {}
    for bits in (3, 4):
        rows = {}
        for name, (m, count) in DECODER.items():
            m = max(1, int(m * scale))
            print(f"measuring {bits} bits, {name} ...", flush=True)
            rows[name] = dict(count=count, uniquified=measure(dkm_case(m, bits, "bfloat16", True, args)))
            if args.plain_decoder and count == 3:
                rows[name]["not_uniquified"] = measure(
                    dkm_case(m, bits, "bfloat16", False, args, "cpu"))
        results[bits] = rows
    print(f"\nLLaMA-7B decoder layer weights (x {scale:g}), bfloat16, d = 1, uniquified, "
          f"threads={args.threads}")
    print(HEADER)
    summary = {}
    for bits, rows in results.items():
        layer_s, peak, naive = 0.0, 0, 0
        for name, row in rows.items():
            r = row["uniquified"]
            print(row_text(f"{bits} bits, {name}", r))
            if "not_uniquified" in row:
                print(row_text(f"{bits} bits, {name}, not uniquified", row["not_uniquified"]))
            if "forward_s" not in r:
                layer_s = None
                break
            layer_s += row["count"] * r["forward_backward_s"]
            peak = max(peak, r["peak_bytes"])
            naive += row["count"] * naive_attention_bytes(r["m"], r["k"])
        if layer_s is None:
            continue
        big = rows["gate, up, down (11008 x 4096)"]["uniquified"]
        per_weight = big["forward_backward_s"] / big["m"]
        projected = LLAMA_7B_LAYERS * layer_s + LLAMA_7B_EMBEDDINGS * scale * per_weight
        summary[bits] = dict(layer_forward_backward_s=layer_s, layer_peak_bytes=peak,
                             naive_attention_bytes=naive,
                             projected_llama_7b_step_s=projected)
        print(f"{bits} bits: one layer {layer_s:.2f} s forward+backward (weights one after "
              f"another), peak {mib(peak)} (the largest weight); the naive reference would keep "
              f"{mib(naive)} of attention; projected LLaMA-7B DKM step: {projected:.0f} s")
    print()
    return dict(rows={bits: rows for bits, rows in results.items()}, summary=summary)


def model_part(args):
    try:
        import transformers  # noqa: F401
    except ImportError:
        return dict(skipped="transformers is not installed")
    rows = {}
    for label, compressed, uniquify in (("uncompressed", False, False),
                                        ("4 bits, uniquified", True, True),
                                        ("4 bits, not uniquified", True, False)):
        print(f"measuring model: {label} ...", flush=True)
        rows[label] = measure(dict(kind="model", compressed=compressed, uniquify=uniquify,
                                   repeats=args.repeats, threads=args.threads))
    print("\nsmall LLaMA configuration (4 layers, hidden 256), bfloat16, batch 4 x 64 tokens, "
          "SGD step")
    for label, r in rows.items():
        if "step_s" in r:
            print(f"{label:<26} {r['step_s']:>8.3f} s/step  peak {mib(r['peak_bytes']):>11}")
        else:
            print(f"{label:<26} {r.get('error')}")
    print()
    return dict(rows=rows)


def main(argv=None) -> dict:
    parser = script_parser(__doc__, repeats=3, out="llm_layer.json")
    parser.add_argument("--parts", default="projection,decoder,model")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in each case (default: torch's own choice)")
    parser.add_argument("--rows", type=int, default=PROJECTION,
                        help="weights of the projection; the decoder's shapes scale with it")
    parser.add_argument("--plain-decoder", action="store_true",
                        help="also run the decoder's 11008 x 4096 case not uniquified")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    payload = dict(benchmark="llm_layer", iterations=ITERATIONS, tau=PAPER_TAU,
                   threads=args.threads, machine=machine())
    if "projection" in parts:
        payload["projection"] = projection_part(args, args.rows)
    if "decoder" in parts:
        payload["decoder"] = decoder_part(args, args.rows / PROJECTION)
    if "model" in parts:
        payload["model"] = model_part(args)
    write_json(results_path(args.out), payload)
    return payload


if __name__ == "__main__":
    if not serve_worker(_case_worker):
        main()
