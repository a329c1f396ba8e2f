"""Memory of a COCO-format detection reader at Objects365 size (issue 29), measured in a fresh process.

    python scripts/annotation_memory.py --images 170000 --boxes 2500000 [--repo PATH]

Writes a generated annotation JSON (365 categories, boxes spread over the images, every image an empty file,
since the reader only checks that it exists) under $TMPDIR, then in this process: builds the reader the way a
rank does, reports the rank's RSS and peak RSS; forks a child that, like a loader worker, reads 100 batches of
annotations (64 random images each) and reports the memory it stopped sharing (Private_Dirty). `--repo` reads
xlearner from another checkout (the code before a change). Generated data is deleted at the end; nothing is
committed. One JSON line.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time


def private_dirty_mb() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(ln.split()[1]) for ln in f if ln.startswith("Private_Dirty")) / 1024


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024


def generate(root: str, n_images: int, n_boxes: int) -> str:
    rng = random.Random(0)
    os.makedirs(f"{root}/images")
    for i in range(n_images):
        open(f"{root}/images/{i:08d}.jpg", "wb").close()
    images = [{"id": i, "file_name": f"{i:08d}.jpg", "width": 1024, "height": 768} for i in range(n_images)]
    anns = [{"id": k, "image_id": rng.randrange(n_images), "category_id": rng.randrange(1, 366), "iscrowd": 0,
             "area": 1000.0, "bbox": [rng.uniform(0, 900), rng.uniform(0, 650), rng.uniform(5, 120),
                                      rng.uniform(5, 110)]} for k in range(n_boxes)]
    cats = [{"id": c, "name": f"class{c}"} for c in range(1, 366)]
    with open(f"{root}/ann.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return f"{root}/ann.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=170_000)
    ap.add_argument("--boxes", type=int, default=2_500_000)
    ap.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="annmem-")
    try:
        ann = generate(root, a.images, a.boxes)
        json_mb = os.path.getsize(ann) / 2**20
        gc.collect()
        sys.path.insert(0, a.repo)
        try:  # this checkout's layout, or a checkout from before the readers moved to xlearner/formats/
            from xlearner.formats.files import CocoReader  # noqa: E402
        except ImportError:
            from xlearner.datasets import CocoReader  # noqa: E402
        base = rss_mb()
        t0 = time.time()
        reader = CocoReader(f"{root}/images", ann)
        gc.collect()
        out = {"images": a.images, "boxes": a.boxes, "json_mb": round(json_mb), "read_s": round(time.time() - t0, 1),
               "rank_rss_mb": round(rss_mb() - base), "peak_rss_mb": round(resource.getrusage(
                   resource.RUSAGE_SELF).ru_maxrss / 1024), "has_coco_index": getattr(reader, "_coco", 1) is not None}
        if hasattr(gc, "freeze") and "freeze" in open(os.path.join(a.repo, "xlearner", "data.py")).read():
            gc.freeze()  # what data.MultiSourceLoader does before its workers fork, where the code does it
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # a loader worker: 100 batches of 64 images' annotations, as reader.load reads them
            before = private_dirty_mb()
            rng = random.Random(1)
            for _ in range(100 * 64):
                item = reader.items[rng.randrange(len(reader.items))]
                if len(item) == 6:
                    reader.boxes[item[4]:item[5]].copy()
                else:
                    [b for b, _ in item[4]]
            os.write(w, json.dumps(private_dirty_mb() - before).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        out["worker_copied_mb"] = round(float(os.read(r, 100)), 1)
        print(json.dumps(out))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
