"""What checking the caches' content costs, against what the caches save.

    python -m benchmark.checksum_bench WORKDIR

Writes two test lists into ``WORKDIR`` (three toy-world slots at the toy CLIP's image
size; a synthetic ImageNet test list of 256-pixel JPEGs cut to 224) and, for each, in one
process with one thread and no loader workers: the decoded-image cache entry built (decode,
write, checksums and the first check), the CRC-32 of the whole entry against decoding,
and a second open of the entry (description and check, not remembered).  Then the check of
the whole toy world's manifest (the world written into ``WORKDIR/worlds``, read from the
page cache) and the checksum of 50,000 x 512 half-precision features, ImageNet's test set
in the feature cache.
One JSON line per measurement.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from benchmark import image_cache
from benchmark.config import get_cfg_default
from benchmark.files import checksum, tensor_checksum
from benchmark.image_cache import DecodedImages
from datasets.build import build_dataset


def _seconds(fn: Callable[[], object], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _cfg(size: int):
    cfg = get_cfg_default()
    cfg.INPUT.SIZE = (size, size)
    cfg.INPUT.INTERPOLATION = "bicubic"
    cfg.INPUT.TRANSFORMS = ("normalize",)
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def measure_list(label: str, data: list, size: int, cache_dir: Path) -> dict:
    cfg = _cfg(size)
    start = time.perf_counter()
    entry = DecodedImages.open_or_build(data, cfg, cache_dir, num_workers=0)
    build = time.perf_counter() - start
    array, block = entry.array, image_cache.BUILD_BATCH_SIZE
    check = _seconds(lambda: [checksum(array[i:i + block]) for i in range(0, len(array), block)])
    image_cache._VERIFIED.clear()  # the second open checks again
    reopen = _seconds(lambda: DecodedImages.open_or_build(data, cfg, cache_dir), repeat=1)
    return {"list": label, "images": len(data), "pixels": f"{size}x{size}", "entry_MB": round(array.nbytes / 1e6, 1),
            "decode_images_per_s": round(len(data) / build, 1), "crc32_MB_per_s": round(array.nbytes / check / 1e6),
            "check_s": round(check, 4), "check_share_of_decoding_percent": round(100 * check / build, 2),
            "reopen_s": round(reopen, 4)}


def main(argv: list[str] | None = None) -> int:
    from datasets.synthetic import write_synthetic_dataset
    from datasets.toy import toy_image_size, write_toy_root

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    work = Path(argv[0])
    torch.set_num_threads(1)
    slots = ("imagenet", "sun397", "stanford_cars")
    toy_root = work / "toy"
    if not (toy_root / "imagenet").exists():
        write_toy_root(toy_root, list(slots))
    toy = [d for name in slots for d in build_dataset(name, toy_root).test]
    print(json.dumps(measure_list("toy world test lists (imagenet, sun397, stanford_cars)", toy, toy_image_size(),
                                  work / "cache-toy")))
    big_root = work / "synthetic"
    if not (big_root / "imagenet").exists():
        write_synthetic_dataset("imagenet", big_root, n_classes=100, n_train=1, n_val=0, n_test=20, image_size=256)
    big = list(build_dataset("imagenet", big_root).test)
    print(json.dumps(measure_list("synthetic imagenet test list, 256 px JPEGs cut to 224", big, 224,
                                  work / "cache-224")))
    from datasets.worlds import damaged_files, prepare_world

    world = prepare_world("toy", work, cache=work / "worlds")
    files = sum(1 for p in world.rglob("*") if p.is_file())
    damaged_files(world)  # once to fill the page cache: the check a sweep does on a world it reads
    seconds = _seconds(lambda: damaged_files(world))
    print(json.dumps({"world_manifest_check": "the whole toy world", "files": files, "seconds": round(seconds, 3)}))
    features = torch.randn(50000, 512).half()
    seconds = _seconds(lambda: tensor_checksum(features))
    print(json.dumps({"feature_checksum": "50000 x 512 fp16", "seconds": round(seconds, 4),
                      "MB_per_s": round(features.numel() * 2 / seconds / 1e6)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
