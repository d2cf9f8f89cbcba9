"""Rebuild the shared CIFAR-10 arrays from the JPEG bytes, for a machine that gets only the smaller file.

    python launch/rebuild_cifar10.py DATA_DIR

``DATA_DIR/cifar10_jpeg75_files.npz`` (all 60,000 JPEG files as they came, 18 MB) is decoded with Pillow into the two
files the configs read, in the shared folder's order: ``cifar10_train_jpeg75_10k.npz`` (the first 1,000 training
images of each class, keys ``x``, ``y``, ``idx_in_class``) and ``cifar10_test_jpeg75.npz`` (the 10,000 test images
sorted by class, then by rank within the class; keys ``x``, ``y``, ``idx_in_class``). Before writing, the sha256 of
the decoded full train and test arrays is checked against the hashes published in ``shared/data/README.md``: a
Pillow that decodes differently fails here, in one line, instead of giving other images. ``launch/gpu_check.sh``
runs this on a lent GPU machine, where the decoded files would not fit the 64 MiB that travels.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pathlib
import sys

import numpy as np

#: sha256 of the decoded ``x`` of all 50,000 training images (order as stored) and of the 10,000 test images,
#: as published in shared/data/README.md
SHA256 = {"train": "bf3aabd52be912dae02a0435296c4dab5289524b57f55cd162dc4796935a611b",
          "test": "5a6aa8185204d80b65d3dfb540696dadd5f10d185ded226a96665d3e0fc6259f"}


def decode(buf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The JPEG files ``buf[offsets[i]:offsets[i+1]]`` decoded to uint8 RGB, ``[N, H, W, 3]``."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(buf[a:b].tobytes())).convert("RGB"))
                     for a, b in zip(offsets[:-1], offsets[1:])])


def rebuild(files: dict, per_class: int = 1000, sha256: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
    """The train subset (first ``per_class`` images of each class, in stored order) and the test set (sorted by
    class, then rank within class) decoded from ``files`` (the arrays of ``cifar10_jpeg75_files.npz``); raises
    ValueError naming the split when a decoded array's sha256 differs from ``sha256[split]``."""
    out = {}
    for split in ("train", "test"):
        x = decode(files[f"{split}_jpeg"], files[f"{split}_offsets"])
        y, rank = np.asarray(files[f"{split}_y"]), np.asarray(files[f"{split}_idx_in_class"])
        if sha256 and split in sha256:
            got = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
            if got != sha256[split]:
                raise ValueError(f"decoded {split} images: sha256 {got[:16]}... differs from the published "
                                 f"{sha256[split][:16]}... (this Pillow decodes JPEG differently)")
        if split == "train":
            keep = np.nonzero(rank < per_class)[0]
            keep = keep[np.lexsort((rank[keep], y[keep]))]
        else:
            keep = np.lexsort((rank, y))
        out[split] = {"x": x[keep], "y": y[keep].astype(np.int64), "idx_in_class": rank[keep].astype(np.int64)}
    return out


def main(argv: list[str] | None = None) -> int:
    """Write the two decoded files into DATA_DIR (skipped when both exist)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", type=pathlib.Path)
    a = p.parse_args(argv)
    names = {"train": "cifar10_train_jpeg75_10k.npz", "test": "cifar10_test_jpeg75.npz"}
    if all((a.data_dir / n).exists() for n in names.values()):
        print(f"rebuild_cifar10: {a.data_dir} already has {', '.join(names.values())}", file=sys.stderr)
        return 0
    src = a.data_dir / "cifar10_jpeg75_files.npz"
    if not src.exists():
        print(f"error: {src} not found (copy it from shared/data)", file=sys.stderr)
        return 2
    with np.load(src) as f:
        try:
            out = rebuild({k: f[k] for k in f.files}, sha256=SHA256)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    for split, name in names.items():
        np.savez(a.data_dir / name, **out[split])
        print(f"rebuild_cifar10: wrote {a.data_dir / name} ({len(out[split]['y'])} images, sha256 checked)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
