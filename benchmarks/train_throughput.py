"""Training throughput: the sources' way against this project's train stage, on one device.

    python -m benchmarks.train_throughput [--device auto] [--steps 40] [--rounds 3]

Both paths train README 004's I1 (the default params.yaml model) with the same batch size,
optimiser (SGD Nesterov + OneCycle) and augmentation (RandomAffine 10 deg, 5 %, 0.98-1.02):

  sources' way  torchvision MNIST + per-sample RandomAffine/ToTensor/Normalize in a
                DataLoader with worker processes, NCHW fp32 (what the sources' notebooks do)
  project       mnistlab.loop.train_one_epoch, exactly as the train stage calls it: data held
                on the device, batched affine warps, channels_last, autocast per `precision`

Paths run interleaved (A, B, A, B, ...) and the median is reported, because a shared
machine's speed drifts from one run to the next. The floor is the model's FLOPs per image (forward and
backward, counted by torch's FlopCounterMode) over the device's measured matmul rate in
the same dtype: the epoch time a perfectly efficient implementation would need.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import fork_safe, fresh_training, header, sources_loader, sync
from mnistlab.data import Split, load_split
from mnistlab import runtime
from mnistlab.runtime import cpu_flags
from mnistlab.loop import (
    make_optimizer,
    make_scheduler,
    train_one_epoch,
    training_forward,
)
from mnistlab.model import build_model
from mnistlab.config import load_params
from tools import doc_blocks

EPOCH_IMAGES = 60_000


@contextmanager
def peak_memory(device: torch.device, result: dict):
    """Peak RSS of this process and its workers (CPU), or max allocated (GPU), in MiB."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        yield
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_with_children())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join()
        result["peak_mib"] = peak[0] / 2**20


def _rss_with_children() -> int:
    """RSS in bytes of this process and its direct children (DataLoader workers)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    pids = [os.getpid()]
    try:
        children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
        pids += [int(pid) for pid in children]
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except OSError:
            pass
    return total


def sources_way(params, device: torch.device, steps: int, workers: int) -> dict:
    """The sources' training loop on `steps` batches of `sources_loader`."""
    loader = sources_loader(params, device, workers)
    torch.manual_seed(0)
    model = build_model(params.model, inplace_relu=False).to(device)
    optimizer = make_optimizer(model, params.train)
    scheduler = make_scheduler(optimizer, params.train, steps + 5)
    model.train()
    result: dict = {}
    with peak_memory(device, result):
        with fork_safe():
            batches = iter(loader)
        for step in range(steps + 3):  # 3 warm-up steps: workers start, caches fill
            if step == 3:
                sync(device)
                started = time.perf_counter()
            images, labels = next(batches)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss.item()  # the sources' loop reads the loss every step for tqdm
        sync(device)
        seconds = time.perf_counter() - started
    del batches, loader
    result["images_per_second"] = steps * params.train.batch_size / seconds
    return result


def project_way(params, device: torch.device, train: Split, steps: int,
                dtype: torch.dtype, compile_model: bool = False) -> dict:
    """mnistlab.loop.train_one_epoch on the first `steps` batches, as the train stage runs it
    (with `compile_model`, on the torch.compile'd model: a lever the stage does not use)."""
    bs = params.train.batch_size
    subset = Split(images=train.images[: (steps + 3) * bs], labels=train.labels[: (steps + 3) * bs])
    model, optimizer, scheduler, generator = fresh_training(params, device, steps)
    warmup = Split(images=subset.images[: 3 * bs], labels=subset.labels[: 3 * bs])
    started = time.perf_counter()  # warm-up includes compiling or the CUDA graph capture
    forward = torch.compile(model) if compile_model else training_forward(
        model, warmup, params.train, dtype)
    train_one_epoch(model, warmup, optimizer, scheduler, params.train, generator, dtype, 0,
                    forward)
    warmup_seconds = time.perf_counter() - started
    timed = Split(images=subset.images[3 * bs:], labels=subset.labels[3 * bs:])
    result: dict = {}
    with peak_memory(device, result):
        sync(device)
        started = time.perf_counter()
        train_one_epoch(model, timed, optimizer, scheduler, params.train, generator, dtype, 1,
                        forward)
        sync(device)
        seconds = time.perf_counter() - started
    result["images_per_second"] = len(timed) / seconds
    result["warmup_seconds"] = warmup_seconds
    return result


@contextmanager
def denormals_kept():
    """Denormal floats computed in full, not flushed to zero as mnistlab.runtime.configure sets."""
    torch.set_flush_denormal(False)
    try:
        yield
    finally:
        torch.set_flush_denormal(True)


# CPU levers tried against the 2.5x target (`--attempts`), each a setting around one row:
# the stage keeps none of them, and the table says what each one is worth.
CPU_ATTEMPTS = {
    # ATen's own im2col + GEMM convolutions and BatchNorm instead of oneDNN's kernels.
    "project, fp32, oneDNN off": lambda: torch.backends.mkldnn.flags(enabled=False),
    "project, fp32, denormals not flushed": denormals_kept,
}


def with_train(params, **changes):
    """`params` with some `train.*` values changed: one lever at a time."""
    return params.model_copy(update={"train": params.train.model_copy(update=changes)})


def flops_per_image(params, device: torch.device) -> float:
    """Forward + backward FLOPs of one training image (convs and matmuls)."""
    model = build_model(params.model).to(device)
    images = torch.randn(8, 1, 28, 28, device=device)
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    return counter.get_total_flops() / len(images)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, size: int = 2048) -> float:
    """Measured FLOP/s of a large square matmul in `dtype`: the device's practical peak."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps, started = 0, time.perf_counter()
    while time.perf_counter() - started < 1.0:
        a @ b
        reps += 1
    sync(device)
    return 2 * size**3 * reps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs of each path")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers for the sources' way")
    parser.add_argument("--compile", action="store_true",
                        help="add a row: the project path on the torch.compile'd model")
    parser.add_argument("--malloc", choices=["keep", "default"], default="keep",
                        help="CPU: keep freed memory in the process, as the stages do "
                             "(mnistlab.runtime.keep_freed_memory), or glibc's defaults; "
                             "process-wide, so it applies to every row")
    parser.add_argument("--attempts", action="store_true",
                        help="CPU: add a row for each lever of CPU_ATTEMPTS, kept or not")
    parser.add_argument("--readme", action="store_true",
                        help="also write the table into its block of docs/performance.md")
    args = parser.parse_args()

    params = load_params()
    setup = runtime.setup(params, device=args.device, keep_memory=args.malloc == "keep")
    device, auto_dtype = setup.device, setup.dtype
    train = load_split(train=True, device=device)
    flops = flops_per_image(params, device)

    # (label, params, autocast dtype, compiled): the default path, then one lever at a time.
    variants = [("project (as the train stage runs)", params, auto_dtype, False)]
    if args.compile:
        variants.append(("project + torch.compile", params, auto_dtype, True))
    if auto_dtype != torch.float32:
        variants.append(("project, fp32", params, torch.float32, False))
    elif device.type == "cuda" or cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        # `precision: auto` chose fp32 here: show what bf16 would do. (A CPU with neither
        # flag emulates bf16, a hundred times slower: no row.)
        variants.append(("project, bf16 autocast", params, torch.bfloat16, False))
    if device.type == "cuda" and params.train.cuda_graphs:
        variants.append(("project, no CUDA graphs", with_train(params, cuda_graphs=False),
                         auto_dtype, False))
    variants.append(("project, fp32, no channels_last",
                     with_train(params, channels_last=False), torch.float32, False))
    settings = {label: nullcontext for label, *_ in variants}
    if args.attempts and device.type == "cpu":
        for label, setting in CPU_ATTEMPTS.items():
            variants.append((label, params, torch.float32, False))
            settings[label] = setting

    rows: dict[str, list[dict]] = {"sources' way (DataLoader)": []}
    rows.update({label: [] for label, *_ in variants})
    for round_ in range(args.rounds):
        rows["sources' way (DataLoader)"].append(sources_way(params, device, args.steps, args.workers))
        for label, variant, dtype, compiled in variants:
            with settings[label]():
                rows[label].append(project_way(variant, device, train, args.steps, dtype,
                                               compiled))
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)

    ceilings = {dtype: matmul_ceiling(device, dtype) for dtype in dict.fromkeys(
        [torch.float32, *(dtype for _, _, dtype, _ in variants)])}
    dtypes = {"sources' way (DataLoader)": torch.float32,
              **{label: dtype for label, _, dtype, _ in variants}}
    baseline = statistics.median(r["images_per_second"] for r in rows["sources' way (DataLoader)"])
    options = (" --compile" if args.compile else "") + (
        " --attempts" if args.attempts else "") + (
        f" --malloc {args.malloc}" if args.malloc != "keep" else "")

    lines = [
        header(device, f"python -m benchmarks.train_throughput --device {args.device} "
                       f"--steps {args.steps} --rounds {args.rounds}{options}",
               f"model {params.base.preset} "
               f"({sum(p.numel() for p in build_model(params.model).parameters()):,} "
               f"parameters, {flops / 1e6:.1f} MFLOP per image forward + backward); batch "
               f"{params.train.batch_size}; {args.steps} timed steps x {args.rounds} "
               "interleaved rounds (median)"
               + ("; glibc malloc at its defaults" if args.malloc == "default" else "")),
        "",
        "| path | dtype | images/s | epoch s | vs sources' way | floor epoch s | x floor | peak MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, results in rows.items():
        ips = statistics.median(r["images_per_second"] for r in results)
        peak = max(r["peak_mib"] for r in results)
        dtype = dtypes[label]
        floor = EPOCH_IMAGES * flops / ceilings[dtype]
        epoch = EPOCH_IMAGES / ips
        lines.append(f"| {label} | {str(dtype).removeprefix('torch.')} | {ips:,.0f} | "
                     f"{epoch:.3g} | {ips / baseline:.2f}x | {floor:.3g} | {epoch / floor:.0f}x | "
                     f"{peak:,.0f} |")
    lines.append("")
    if args.compile:
        compiling = rows["project + torch.compile"][0]["warmup_seconds"]
        lines.append(f"torch.compile: the first 3 steps, compiling included, took {compiling:.1f} s.")
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32  # as configure() set
    lines += [f"Matmul ceiling ({2048}x{2048}, {str(dtype).removeprefix('torch.')}"
              f"{', TF32 tensor cores' if tf32 and dtype == torch.float32 else ''}): "
              f"{rate / 1e12:.3f} TFLOP/s." for dtype, rate in ceilings.items()]
    lines.append(f"The project's row trains in the precision `train.precision: "
                 f"{params.train.precision}` resolves to: {setup.why}.")
    print("\n" + "\n".join(lines))
    if args.readme:
        # A CPU with AMX tiles, or whose kernels are narrower than AVX-512 (another CPU, or
        # this one under ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA), gets its own block.
        cpu = device.type == "cpu"
        isa = torch.backends.cpu.get_cpu_capability()
        amx = cpu and "amx_bf16" in cpu_flags()
        narrower = cpu and isa not in ("AVX512", "DEFAULT")
        block = (f"bench-{device.type}" + ("-amx" if amx else "")
                 + (f"-{isa.lower()}" if narrower else "")
                 + ("-malloc-default" if args.malloc == "default" else "")
                 + ("-attempts" if args.attempts else ""))
        doc_blocks.update({block: lines})


if __name__ == "__main__":
    main()
