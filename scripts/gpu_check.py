"""Issue 21 item 5: what `moe.capacity` costs and saves on one NVIDIA GPU, without vLLM.

    python scripts/gpu_check.py [--vllm-src DIR] [--tokens 28672] [--reps 7] [--json OUT]
    python scripts/gpu_check.py --cpu-dry-run      # small sizes on the CPU: code paths only
    python scripts/gpu_check.py --cpu-dry-run --interpret --vllm-src DIR   # + vLLM's kernel,
                                                   # run by Triton's interpreter on the CPU

Needs torch with CUDA (and Triton for the kernel part); vLLM need not be installed. At the
seed's scale by default: 8 x 3.5K tokens in one MoE call, top-8 of 256 experts
(DeepSeek-V3-shaped grouped routing, ascend_patch.lab.routing_sim, per-rank max/mean 2.5),
EP16 simulated on the one GPU (simulate_ep_size). For each drop ratio r it measures:

1. The drop step (planner + ids, drop_step.DropStep) and the planner alone
   (planner.capacity.plan_drops) per layer call: medians of --reps, wall time with the
   device synchronised before and after (the step reads counts on the host, so it syncs).
2. Device-to-host synchronisations per call, counted two ways: CUDA's own
   (torch.cuda.set_sync_debug_mode("warn") warns on every synchronising op; the warnings
   are counted) and the Python-level host reads (Tensor.item/tolist/__int__/__bool__/
   __float__/cpu/numpy and .to("cpu"), patched for the call: each is a sync on a GPU).
3. With --vllm-src (a vLLM source tree or wheel unpacked, e.g. a git checkout): vLLM's
   Triton `fused_moe_kernel` compiled from its own fused_moe.py (every top-level
   @triton.jit function of that file, nothing else of vLLM imported) and run for the
   bottleneck EP rank (most rows after the drops) on what the adapter hands it
   (adapters/triton_route.py: dropped rows as the sentinel expert, extended expert_map),
   aligned by the torch emulation of moe_align_block_size (triton_align.py: vLLM's CUDA
   align op is not built without vLLM). GEMM1 + GEMM2 kernel time (CUDA events around the
   two launches; the emulated alignment, silu-and-mul and the top-k sum are not timed).
   The workspace is NaN-filled first: the dropped slots must still be NaN afterwards (never
   written = never computed), and a sample of tokens is compared with a torch reference.
   With --cpu-dry-run --interpret the same kernel runs in Triton's interpreter on the CPU.

Prints one table with ratios against r = 0 measured in the same run. Without a CUDA GPU it
exits 2 with one line (unless --cpu-dry-run). Never run on a GPU by its author (no GPU was
lent to that session): the figures are whatever the card running it measures.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ascend_patch.impls.moe.adapters.triton_route import EXPERT_MAP, TritonRoute  # noqa: E402
from ascend_patch.impls.moe.drop_step import DropStep  # noqa: E402
from ascend_patch.impls.moe.options import CapacityOptions  # noqa: E402
from ascend_patch.impls.moe.planner.capacity import plan_drops  # noqa: E402
from ascend_patch.lab.triton_align import (  # noqa: E402
    fused_moe_blocks,
    moe_align_block_size,
    moe_sum_op,
)
from ascend_patch.lab.routing_sim import deepseek_routing  # noqa: E402

SEED_TOKENS = 8 * 3584  # the seed PR's batch: 8 prompts of 3.5K tokens
DRY = {"tokens": 512, "experts": 64, "top_k": 4, "ep_size": 8, "hidden": 64,
       "intermediate": 32, "reps": 2, "skew": "balanced"}
KERNEL_FILE = "vllm/model_executor/layers/fused_moe/fused_moe.py"
# vLLM's default tile for unquantized MoE with many tokens (fused_moe.py get_default_config).
CONFIG = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 8}


class Refusal(Exception):
    """A one-line reason to exit 2."""


# --------------------------------------------------------------------------------------
# device-to-host synchronisations
# --------------------------------------------------------------------------------------

_HOST_READS = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__", "cpu",
               "numpy")


@contextlib.contextmanager
def host_reads() -> Iterator[list[str]]:
    """Records every Python-level read of a tensor's value on the host during the block."""
    seen: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}
    original_to = torch.Tensor.to

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            seen.append(name)
            return fn(self, *args, **kwargs)
        return read

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
            seen.append("to(cpu)")
        return original_to(self, *args, **kwargs)

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    torch.Tensor.to = to
    try:
        yield seen
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.Tensor.to = original_to


def cuda_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Synchronising CUDA ops during fn(), by torch's sync debug mode (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def timed(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    """Median wall seconds of fn() with the device synchronised around each call."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up (allocator, first-call caches)
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------------------
# vLLM's Triton kernel from its source file
# --------------------------------------------------------------------------------------


def kernel_source(vllm_src: str) -> Path:
    root = Path(vllm_src)
    for candidate in (root, root / KERNEL_FILE, root / KERNEL_FILE.split("/", 1)[1]):
        if candidate.is_file() and candidate.name == "fused_moe.py":
            return candidate
    raise Refusal(f"--vllm-src {vllm_src}: no {KERNEL_FILE} there (give a vLLM source tree)")


def load_kernel(path: Path) -> Any:
    """vLLM's `fused_moe_kernel` JIT function, built from every top-level @triton.jit
    function of its file (original line numbers kept: Triton reads the source back)."""
    import triton
    import triton.language as tl

    tree = ast.parse(path.read_text(), filename=str(path))
    jitted = [node for node in tree.body if isinstance(node, ast.FunctionDef) and any(
        ast.unparse(d).startswith("triton.jit") for d in node.decorator_list)]
    if not any(node.name == "fused_moe_kernel" for node in jitted):
        raise Refusal(f"{path}: no @triton.jit fused_moe_kernel in it")
    namespace: dict[str, Any] = {"triton": triton, "tl": tl, "torch": torch,
                                 "__name__": "vllm_fused_moe_kernels"}
    code = compile(ast.Module(body=jitted, type_ignores=[]), str(path), "exec")
    exec(code, namespace)  # noqa: S102 - vLLM's own kernel source, given by the user
    return namespace["fused_moe_kernel"]


def kernel_arguments(kernel: Any, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                     topk_weights: torch.Tensor, aligned: tuple[torch.Tensor, ...],
                     mul_routed_weight: bool, top_k: int) -> dict[str, Any]:
    """Keyword arguments of one launch, by the kernel's own parameter names (what
    fused_moe.py's invoke_fused_moe_triton_kernel passes for bf16 without quantization)."""
    import triton.language as tl

    sorted_ids, expert_ids, post_pad = aligned
    known = {
        "a_ptr": a, "b_ptr": b, "c_ptr": c, "b_bias_ptr": None, "a_scale_ptr": None,
        "b_scale_ptr": None, "topk_weights_ptr": topk_weights,
        "sorted_token_ids_ptr": sorted_ids, "expert_ids_ptr": expert_ids,
        "num_tokens_post_padded_ptr": post_pad, "N": b.size(1), "K": b.size(2),
        "EM": sorted_ids.size(0), "num_valid_tokens": a.size(0) * top_k,
        "stride_am": a.stride(0), "stride_ak": a.stride(1), "stride_be": b.stride(0),
        "stride_bk": b.stride(2), "stride_bn": b.stride(1), "stride_cm": c.stride(1),
        "stride_cn": c.stride(2), "stride_asm": 0, "stride_ask": 0, "stride_bse": 0,
        "stride_bsk": 0, "stride_bsn": 0, "stride_bbe": 0, "stride_bbn": 0, "group_n": 0,
        "group_k": 0, "naive_block_assignment": False, "MUL_ROUTED_WEIGHT": mul_routed_weight,
        "top_k": top_k, "compute_type": tl.bfloat16 if a.dtype == torch.bfloat16 else tl.float32,
        "use_fp8_w8a8": False, "use_int8_w8a8": False, "use_int8_w8a16": False,
        "per_channel_quant": False, "HAS_BIAS": False, "SWAP_AB": False, "USE_TD": False,
        "SPLIT_K": 1, **CONFIG,
    }
    params = inspect.signature(kernel.fn).parameters
    missing = [n for n, p in params.items() if n not in known and p.default is p.empty]
    if missing:
        raise Refusal(f"fused_moe_kernel takes parameters this check does not know: {missing}")
    return {n: known[n] for n in params if n in known}


def triton_launcher(kernel: Any) -> Callable[..., None]:
    import triton

    def launch(a, b, c, topk_weights, aligned, mul_routed_weight, top_k):
        args = kernel_arguments(kernel, a, b, c, topk_weights, aligned, mul_routed_weight,
                                top_k)
        grid = (triton.cdiv(args["EM"], CONFIG["BLOCK_SIZE_M"])
                * triton.cdiv(b.size(1), CONFIG["BLOCK_SIZE_N"]),)
        kernel[grid](**args)

    return launch


def emulated_launch(a, b, c, topk_weights, aligned, mul_routed_weight, top_k):
    """The dry run's stand-in for the kernel (triton_align.fused_moe_blocks)."""
    fused_moe_blocks(a, b, c, topk_weights, *aligned, mul_routed_weight, top_k,
                     CONFIG["BLOCK_SIZE_M"])


# --------------------------------------------------------------------------------------
# one rank's MoE on what the adapter hands the kernel
# --------------------------------------------------------------------------------------


def rank_moe(launch, x, w13, w2, weights, handed_ids, expert_map, num_experts):
    """(output [T, H], workspace3 [T, k, H]) of one EP rank: vLLM TritonExperts.apply's
    steps (align, GEMM1, silu-and-mul, GEMM2, pad-aware sum) with the kernel `launch`."""
    tokens, top_k = handed_ids.shape
    aligned = moe_align_block_size(handed_ids, CONFIG["BLOCK_SIZE_M"], num_experts,
                                   expert_map, ignore_invalid_experts=True)
    inter2 = w13.size(1)
    cache1 = torch.full((tokens, top_k, inter2), float("nan"), dtype=x.dtype, device=x.device)
    cache3 = torch.full((tokens, top_k, w2.size(1)), float("nan"), dtype=x.dtype,
                        device=x.device)

    def kernels() -> float:
        """Seconds spent in the two kernel launches (CUDA events; silu-and-mul excluded)."""
        with _stopwatch(x.device) as gemm1:
            launch(x, w13, cache1, weights, aligned, False, top_k)
        gate, up = cache1.view(-1, inter2).chunk(2, dim=1)
        cache2 = (torch.nn.functional.silu(gate.float()) * up.float()).to(x.dtype)
        with _stopwatch(x.device) as gemm2:
            launch(cache2, w2, cache3, weights, aligned, True, 1)
        return gemm1() + gemm2()

    kernels()
    out = torch.empty(tokens, w2.size(1), dtype=x.dtype, device=x.device)
    moe_sum_op(cache3, out, handed_ids, expert_map)
    return out, cache3, kernels


@contextlib.contextmanager
def _stopwatch(device: torch.device) -> Iterator[Callable[[], float]]:
    """Yields a reader of the block's elapsed seconds (device time on CUDA)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield lambda: (end.synchronize(), start.elapsed_time(end) / 1e3)[1]
        end.record()
        return
    began = time.perf_counter()
    elapsed: list[float] = []
    yield lambda: elapsed[0]
    elapsed.append(time.perf_counter() - began)


def timed_kernels(kernels: Callable[[], float], reps: int) -> float:
    """Median over reps of the launches' own time (after one warm-up call)."""
    kernels()
    return statistics.median(kernels() for _ in range(reps))


def reference(x, w13, w2, weights, ids, keep, local, tokens):
    """Torch reference of the first `tokens` tokens: kept rows of local experts only."""
    out = torch.zeros(tokens, w2.size(1), dtype=torch.float32, device=x.device)
    inter = w13.size(1) // 2
    for slot in range(ids.size(1)):
        for t in range(tokens):
            e = int(ids[t, slot])
            if not keep[t, slot] or local[e] < 0:
                continue
            h = w13[local[e]].float() @ x[t].float()
            act = torch.nn.functional.silu(h[:inter]) * h[inter:]
            out[t] += float(weights[t, slot]) * (w2[local[e]].float() @ act)
    return out


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------


def drop_rows(ratio: float, sizes: dict, weights, ids, reps: int, device) -> dict:
    """Drop step and planner figures of one ratio, and its plan."""
    options = CapacityOptions(drop_token_ratio=ratio, simulate_ep_size=sizes["ep_size"],
                              min_tokens=0)
    step = DropStep(num_experts=sizes["experts"], ep_size=1, options=options)
    plan_kwargs = {"num_experts": sizes["experts"], "ep_size": 1, "options": options}
    plan = step.plan(weights, ids)
    with host_reads() as reads:
        step(weights, ids)
    return {
        "ratio": ratio,
        "rows": plan.routed_rows,
        "dropped": plan.dropped_rows,
        "plan": plan,
        "step_s": timed(lambda: step(weights, ids), reps, device),
        "planner_s": timed(lambda: plan_drops(weights, ids, **plan_kwargs), reps, device),
        "cuda_syncs": cuda_syncs(lambda: step(weights, ids), device),
        "host_reads": len(reads),
        "host_read_kinds": sorted(set(reads)),
    }


def kernel_figures(row: dict, launch, sizes: dict, tensors: dict, reps: int, device,
                   check_tokens: int) -> dict:
    """The bottleneck rank's kernel figures at one ratio."""
    plan = row["plan"]
    experts, ep = sizes["experts"], sizes["ep_size"]
    per_rank = experts // ep
    rank = int(torch.argmax(plan.bin_load_after))
    owner = torch.arange(experts, device=device) // per_rank
    layer_map = torch.where(owner == rank, torch.arange(experts, device=device) % per_rank,
                            -1).to(torch.int32)
    route = TritonRoute(EXPERT_MAP, "gpu_check", experts)
    ids = tensors["ids"]
    handed = route.ids(ids.masked_fill(~plan.keep, -1))
    emap = route.expert_map(layer_map, device)
    w13, w2 = tensors["w13"], tensors["w2"]
    out, cache3, kernels = rank_moe(launch, tensors["x"], w13, w2, plan.weights,
                                    handed, emap, route.kernel_num_experts(experts))
    dropped_here = (~plan.keep) & (owner[ids.long()] == rank)
    written = int((~torch.isnan(cache3[dropped_here])).any(dim=-1).sum())
    ref = reference(tensors["x"], w13, w2, plan.weights, ids, plan.keep,
                    layer_map.tolist(), check_tokens)
    err = float((out[:check_tokens].float() - ref).abs().max()) if check_tokens else 0.0
    return {
        "rank": rank,
        "rank_rows": int(plan.bin_load_after[rank]),
        "dropped_here": int(dropped_here.sum()),
        "dropped_written": written,
        "max_abs_err": err,
        "ref_scale": float(ref.abs().max()) if check_tokens else 0.0,
        "kernel_s": timed_kernels(kernels, reps),
    }


def run(args: argparse.Namespace) -> dict:
    dry = args.cpu_dry_run
    device = torch.device("cpu" if dry else "cuda")
    sizes = {**DRY, "reps": args.reps or DRY["reps"]} if dry else {
        "tokens": args.tokens, "experts": args.experts, "top_k": args.top_k,
        "ep_size": args.ep_size, "hidden": args.hidden, "intermediate": args.intermediate,
        "reps": args.reps or 7, "skew": args.skew}
    if sizes["experts"] % sizes["ep_size"]:
        raise Refusal(f"--experts {sizes['experts']} is not a multiple of --ep-size "
                      f"{sizes['ep_size']}")
    launch, kernel_note = None, "not run: no --vllm-src"
    if args.vllm_src:
        path = kernel_source(args.vllm_src)
        if args.interpret:
            # Read by Triton when a function is decorated and again when it first launches
            # (so for the rest of this process): the kernel then runs on CPU tensors.
            os.environ["TRITON_INTERPRET"] = "1"
        try:
            kernel = load_kernel(path)
        except ImportError as exc:
            raise Refusal(f"--vllm-src needs Triton: {exc}") from None
        kernel_arguments(kernel, *_probe_arguments())  # refuses on an unknown signature
        if dry and not args.interpret:
            launch, kernel_note = emulated_launch, f"torch emulation (dry run); {path} loaded"
        elif dry:
            launch = triton_launcher(kernel)
            kernel_note = f"vLLM Triton kernel from {path}, Triton interpreter on the CPU"
        else:
            launch, kernel_note = triton_launcher(kernel), f"vLLM Triton kernel from {path}"
    routing = deepseek_routing(sizes["tokens"], sizes["skew"], ep_size=sizes["ep_size"],
                               num_experts=sizes["experts"], top_k=sizes["top_k"],
                               seed=args.seed)
    weights = routing.topk_weights.to(device)
    ids = routing.topk_ids.to(device=device, dtype=torch.int32)
    tensors = {}
    if launch is not None:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        dtype = torch.float32 if dry else torch.bfloat16
        per_rank = sizes["experts"] // sizes["ep_size"]
        h, i = sizes["hidden"], sizes["intermediate"]
        tensors = {
            "ids": ids,
            "x": torch.randn(sizes["tokens"], h, generator=gen, device=device).to(dtype),
            "w13": (torch.randn(per_rank, 2 * i, h, generator=gen, device=device)
                    / h ** 0.5).to(dtype),
            "w2": (torch.randn(per_rank, h, i, generator=gen, device=device)
                   / i ** 0.5).to(dtype),
        }
    rows = []
    for ratio in args.ratios:
        row = drop_rows(ratio, sizes, weights, ids, sizes["reps"], device)
        if launch is not None:
            try:
                row.update(kernel_figures(row, launch, sizes, tensors, sizes["reps"], device,
                                          min(args.check_tokens, sizes["tokens"])))
            except Refusal:
                raise
            except Exception as exc:  # noqa: BLE001 - another tree's kernel, compiled here
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise Refusal(f"vLLM's kernel failed at r = {ratio:g}: "
                              f"{type(exc).__name__}: {first}") from None
        del row["plan"]
        rows.append(row)
    base = rows[0]
    for row in rows:
        for key in ("step_s", "planner_s", "kernel_s"):
            if key in row and base.get(key):
                row[key.replace("_s", "_ratio")] = row[key] / base[key]
    return {"device": _device_name(device), "torch": torch.__version__, "sizes": sizes,
            "max_over_mean": routing.max_over_mean, "kernel": kernel_note, "rows": rows,
            "dry_run": dry}


def _probe_arguments() -> tuple:
    """Tiny tensors to check the argument table against a loaded kernel's signature."""
    a, b, c = torch.zeros(2, 4), torch.zeros(1, 4, 4), torch.zeros(2, 1, 4)
    aligned = (torch.zeros(64, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
               torch.zeros(1, dtype=torch.int32))
    return a, b, c, torch.zeros(2, 1), aligned, False, 1


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return "CPU (dry run: code paths only, no GPU figures)"


def print_table(result: dict) -> None:
    s = result["sizes"]
    print(f"device: {result['device']}; torch {result['torch']}")
    print(f"{s['tokens']} tokens, top-{s['top_k']} of {s['experts']} experts, EP{s['ep_size']} "
          f"simulated, per-rank max/mean {result['max_over_mean']:.2f}; kernel: "
          f"{result['kernel']}")
    head = ["r", "rows", "dropped", "step ms", "x r=0", "planner ms", "x r=0", "cuda syncs",
            "host reads"]
    kernel = "kernel_s" in result["rows"][0]
    if kernel:
        head += ["rank", "rank rows", "kernel ms", "x r=0", "dropped written", "max err"]
    lines = [head]
    for row in result["rows"]:
        cells = [f"{row['ratio']:g}", str(row["rows"]), str(row["dropped"]),
                 f"{row['step_s'] * 1e3:.3f}", f"{row['step_ratio']:.2f}",
                 f"{row['planner_s'] * 1e3:.3f}", f"{row['planner_ratio']:.2f}",
                 "n/a" if row["cuda_syncs"] is None else str(row["cuda_syncs"]),
                 str(row["host_reads"])]
        if kernel:
            cells += [str(row["rank"]), str(row["rank_rows"]), f"{row['kernel_s'] * 1e3:.3f}",
                      f"{row['kernel_ratio']:.2f}", str(row["dropped_written"]),
                      f"{row['max_abs_err']:.2e}"]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
    kinds = sorted({k for row in result["rows"] for k in row["host_read_kinds"]})
    print(f"host reads per drop-step call are Python-level reads of tensor values ({kinds}); "
          "cuda syncs: torch.cuda.set_sync_debug_mode warnings in one call")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="small sizes on the CPU: exercises the code paths, measures nothing")
    p.add_argument("--vllm-src", help="vLLM source tree (or its fused_moe.py) for the kernel")
    p.add_argument("--interpret", action="store_true",
                   help="with --cpu-dry-run: run vLLM's kernel in Triton's interpreter")
    p.add_argument("--tokens", type=int, default=SEED_TOKENS)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--ep-size", type=int, default=16)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--skew", default="r1", help="balanced, moderate, r1 or a max/mean")
    p.add_argument("--ratios", default="0,0.01,0.02,0.05,0.1")
    p.add_argument("--reps", type=int, help="timed calls per figure (7; dry run 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-tokens", type=int, default=32,
                   help="tokens compared with the torch reference")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    try:
        args.ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        p.error(f"--ratios {args.ratios!r}: comma-separated numbers")
    if not args.ratios or args.ratios[0] != 0 or any(not 0 <= r <= 0.5 for r in args.ratios):
        p.error("--ratios must start with 0 (the baseline) and stay in [0, 0.5]")
    if args.interpret and not (args.cpu_dry_run and args.vllm_src):
        p.error("--interpret runs vLLM's kernel on the CPU: it needs --cpu-dry-run and "
                "--vllm-src")
    if args.skew not in ("balanced", "moderate", "r1"):
        try:
            args.skew = float(args.skew)
        except ValueError:
            p.error(f"--skew {args.skew!r}: balanced, moderate, r1 or a number")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU (torch.cuda.is_available() is False); "
              "--cpu-dry-run runs the code paths on the CPU", file=sys.stderr)
        return 2
    try:
        result = run(args)
    except Refusal as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    bad = [r["ratio"] for r in result["rows"] if r.get("dropped_written")]
    if bad:
        print(f"FAILED: the kernel wrote dropped slots at r = {bad}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
