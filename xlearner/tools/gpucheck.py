"""The GPU check's measurements that no CLI command makes (scripts/gpu_check.sh runs each case in its own process).

    python -m xlearner.tools.gpucheck env
    python -m xlearner.tools.gpucheck backbone --batch 256 --steps 20
    python -m xlearner.tools.gpucheck profile  CLI-ARGS...  (expand in-process: host syncs by call site,
                                                             top kernels, det batch shapes, checkpoint write time)
    python -m xlearner.tools.gpucheck boxes
    python -m xlearner.tools.gpucheck syncbn   CLI-ARGS...  (the CLI under torchrun, every SyncBatchNorm forced
                                                             onto its collective path even on one rank)

Each prints one JSON line last. Nothing here is imported by the method's modules: it measures them.
"""
from __future__ import annotations

import collections
import json
import os
import platform
import shutil
import sys
import time

import torch
import torch.nn as nn
import torchvision


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def case_env() -> dict:
    """The machine: GPU, versions, /dev/shm, cores (every other number is read against these)."""
    shm = shutil.disk_usage("/dev/shm") if os.path.isdir("/dev/shm") else None
    try:
        import pycocotools
        coco = getattr(pycocotools, "__version__", "present")
    except ImportError:
        coco = None
    cuda = torch.cuda.is_available()
    return {"case": "env", "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "gpu_mem_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
            "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "python": platform.python_version(),
            "pycocotools": coco, "cpus": os.cpu_count(),
            "dev_shm_gb": round(shm.total / 2**30, 1) if shm else None}


def case_backbone(batch: int, steps: int) -> dict:
    """A bare torchvision ResNet-50 training step (bf16 autocast, channels_last, SGD), cudnn.benchmark off then on."""
    device = _device()
    model = torchvision.models.resnet50().to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    out = {"case": "backbone", "batch": batch}
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        for i in range(steps + 3):
            if i == 3:  # three warm-up steps (autotuning, allocator)
                _sync(device)
                t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        out[f"images_per_s_benchmark_{'on' if bench else 'off'}"] = round(batch * steps / (time.perf_counter() - t0), 1)
    return out


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _call_site(evt) -> str:
    """The innermost frame in this project's code of a profiler event's nearest ancestor that has a Python stack."""
    while evt is not None:
        frames = [f for f in (getattr(evt, "stack", None) or []) if f"xlearner{os.sep}" in f and "gpucheck" not in f]
        if frames:
            return frames[0]
        evt = evt.cpu_parent
    return "(no Python frame: autograd or a worker thread)"


def case_profile(argv: list[str], first: int = 3, steps: int = 2) -> dict:
    """`cli.py expand ARGV` in this process, profiled over `steps` training steps after `first` warm-up steps:
    the host syncs per step by call site (CUDA runtime sync calls, each traced to its Python frame), the top
    kernels, the detection batches' shapes, and the final checkpoint's write time."""
    from .. import engine
    from ..cli import main
    device = _device()
    det_shapes, save_s, seen = collections.Counter(), [], [0]
    move_to, save = engine.move_to, engine.save_run_checkpoint
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = torch.profiler.profile(activities=activities, with_stack=True)

    def recording_move_to(batch, dev):  # called once per step, before its forward: the profiler's window
        if seen[0] == first:
            prof.start()
        elif seen[0] == first + steps:
            _sync(device)
            prof.stop()
        seen[0] += 1
        for b in batch.values():
            if isinstance(b, dict) and "targets" in b:  # a det batch: a list of differently sized images
                det_shapes[" ".join(f"{im.shape[-2]}x{im.shape[-1]}" for im in b["images"])] += 1
        return move_to(batch, dev)

    def timed_save(*args, **kwargs):
        _sync(device)
        t0 = time.perf_counter()
        out = save(*args, **kwargs)
        save_s.append(time.perf_counter() - t0)
        return out

    engine.move_to, engine.save_run_checkpoint = recording_move_to, timed_save
    main.main(["expand", *argv], standalone_mode=False)
    if seen[0] <= first + steps:
        raise SystemExit(f"gpucheck profile: needs more than {first + steps} steps (expand.steps)")
    events = prof.events()
    syncs = collections.Counter(_call_site(e) for e in events if e.name in SYNC_CALLS)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in table) or 1
    top = sorted(table, key=lambda e: getattr(e, key), reverse=True)[:12]
    return {"case": "profile", "steps": steps, "host_syncs_per_step": sum(syncs.values()) / steps,
            "host_syncs_per_step_by_site": {k: v / steps for k, v in syncs.most_common(15)},
            "top_kernels": [{"name": e.key[:90], "share": round(getattr(e, key) / total, 3), "calls": e.count}
                            for e in top],
            "det_batch_shapes": len(det_shapes), "det_shapes_sample": dict(det_shapes.most_common(4)),
            "checkpoint_write_s": [round(t, 2) for t in save_s]}


def case_boxes() -> dict:
    """One detection batch's anchors and decoded boxes under bf16 autocast vs fp32, on an 800 x 1088 canvas:
    the largest difference in pixels (the same box offsets, rounded to bf16 as a bf16 head predicts them)."""
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import AnchorGenerator
    device = _device()
    g = torch.Generator().manual_seed(0)
    images = ImageList(torch.zeros(1, 3, 800, 1088, device=device), [(800, 1088)])
    feats = [torch.randn(1, 8, 800 // s, 1088 // s, generator=g).to(device) for s in (4, 8, 16, 32, 64)]
    anchors_gen = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    ref_anchors = anchors_gen(images, feats)[0]
    codes = (0.2 * torch.randn(ref_anchors.shape, generator=g)).to(device).bfloat16()
    ref = coder.decode(codes.float(), [ref_anchors]).reshape(-1, 4)
    bf16_anchors = anchors_gen(images, [f.bfloat16() for f in feats])[0]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        boxes = coder.decode(codes, [bf16_anchors]).reshape(-1, 4)
    # after: heads.py's FP32Anchors, and FP32RPNHead's offsets returned as fp32
    from ..heads import FP32Anchors
    ours = FP32Anchors(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        our_anchors = ours(images, [f.bfloat16() for f in feats])[0]
        our_boxes = coder.decode(codes.float(), [our_anchors]).reshape(-1, 4)
    return {"case": "boxes", "canvas": [800, 1088],
            "torchvision": {"anchor_dtype": str(bf16_anchors.dtype), "box_dtype": str(boxes.dtype),
                            "max_anchor_err_px": round((bf16_anchors.float() - ref_anchors).abs().max().item(), 3),
                            "max_box_err_px": round((boxes.float() - ref).abs().max().item(), 3)},
            "ours": {"anchor_dtype": str(our_anchors.dtype), "box_dtype": str(our_boxes.dtype),
                     "max_anchor_err_px": round((our_anchors - ref_anchors).abs().max().item(), 4),
                     "max_box_err_px": round((our_boxes - ref).abs().max().item(), 4)}}


SYNC_CALLS_MADE = [0]  # forced SyncBatchNorm forwards, counted for the syncbn case's closing line


def force_syncbn_collectives() -> None:
    """Make every SyncBatchNorm in training mode take its collective path, even in a one-rank process group
    (torch falls back to plain BN when world_size is 1): the one-GPU stand-in for a multi-GPU job's cost."""
    from torch.nn.modules._functions import SyncBatchNorm as SyncBNFunction
    plain = nn.SyncBatchNorm.forward

    def forward(self, x):
        if not (self.training and torch.distributed.is_initialized()):
            return plain(self, x)
        SYNC_CALLS_MADE[0] += 1
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return SyncBNFunction.apply(x, self.weight, self.bias, *running, self.eps, factor,
                                    self.process_group or torch.distributed.group.WORLD, 1)

    nn.SyncBatchNorm.forward = forward


def main(argv: list[str]) -> None:
    what, rest = argv[0], argv[1:]
    if what == "syncbn":  # a torchrun child: patch, then the CLI as usual (its own lines, no JSON)
        # dist.init_distributed starts a group only for WORLD_SIZE > 1: start the one-rank group here, so that the
        # engine wraps DDP and converts SyncBatchNorm (CUDA) as on a cluster
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        group = f"process group {torch.distributed.get_backend()}, world size {torch.distributed.get_world_size()}"
        force_syncbn_collectives()
        from ..cli import main as cli
        try:  # (the stage destroys the group when it ends)
            cli.main(rest, standalone_mode=False)
        finally:
            print(f"gpucheck syncbn: {group}, forced SyncBatchNorm forwards {SYNC_CALLS_MADE[0]}", file=sys.stderr,
                  flush=True)
        return
    if what == "env":
        result = case_env()
    elif what == "backbone":
        result = case_backbone(int(rest[rest.index("--batch") + 1]), int(rest[rest.index("--steps") + 1]))
    elif what == "profile":
        result = case_profile(rest)
    elif what == "boxes":
        result = case_boxes()
    else:
        raise SystemExit(f"gpucheck: unknown case {what!r} (env, backbone, profile, boxes, syncbn)")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
