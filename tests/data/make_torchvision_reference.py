"""Seeded torchvision ResNet-18/34/50 state dicts (numpy only) and their PyTorch reference logits.

:func:`state_dict` builds, from a seed and with numpy alone, a state dict with exactly the keys, shapes and dtypes
of ``torchvision.models.resnet{18,34,50}(num_classes=K).state_dict()`` (``num_batches_tracked`` included), with
non-trivial BN statistics. :func:`images` gives the seeded test images and :func:`normalise` the float32 NCHW
input both frameworks see. The tests rebuild the weights from the seed, import them through the real
``import-teacher`` path and compare the JAX logits against the committed ``torchvision_reference.npz``.

Run with torch + torchvision installed (a separate venv is fine; neither is a dependency of the project) to
(re)write the reference file; the script checks its keys and shapes against torchvision's own modules first::

    python tests/data/make_torchvision_reference.py [--out tests/data/torchvision_reference.npz]

Only numpy is needed to import this module.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

SEED = 0
NUM_CLASSES = 10  # keeps the committed logits tiny; the converter reads K from fc.weight
IMAGE_SIZE = 64  # torchvision ResNets pool adaptively, so any size >= 32 runs
NUM_IMAGES = 2
DEPTHS = (18, 34, 50)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
OUT = pathlib.Path(__file__).with_name("torchvision_reference.npz")

# depth -> (bottleneck?, blocks per stage), as torchvision.models.resnet defines them
_LAYOUT = {18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)), 50: (True, (3, 4, 6, 3))}


def _module_shapes(depth: int, num_classes: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(kind, name, shape)`` of every parametrised module of torchvision's resnet``depth``, in its order;
    kind is 'conv' (shape OIHW), 'bn' (shape (C,)) or 'fc' (shape (K, C))."""
    bottleneck, blocks = _LAYOUT[depth]
    exp = 4 if bottleneck else 1
    out: list[tuple[str, str, tuple[int, ...]]] = [("conv", "conv1", (64, 3, 7, 7)), ("bn", "bn1", (64,))]
    inplanes = 64
    for s, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
        for b in range(n):
            stride = 2 if (s > 0 and b == 0) else 1
            p = f"layer{s + 1}.{b}"
            if bottleneck:
                convs = [(planes, inplanes, 1), (planes, planes, 3), (planes * exp, planes, 1)]
            else:
                convs = [(planes, inplanes, 3), (planes, planes, 3)]
            for j, (o, i, k) in enumerate(convs, 1):
                out += [("conv", f"{p}.conv{j}", (o, i, k, k)), ("bn", f"{p}.bn{j}", (o,))]
            if stride != 1 or inplanes != planes * exp:
                out += [("conv", f"{p}.downsample.0", (planes * exp, inplanes, 1, 1)),
                        ("bn", f"{p}.downsample.1", (planes * exp,))]
            inplanes = planes * exp
    out.append(("fc", "fc", (num_classes, 512 * exp)))
    return out


def state_dict(depth: int, seed: int = SEED, num_classes: int = NUM_CLASSES) -> dict[str, np.ndarray]:
    """A seeded torchvision resnet``depth`` state dict (float32; ``num_batches_tracked`` int64 scalars).

    Convs are He-normal (fan-in); BN weight in [0.5, 1.5], bias N(0, 0.1), running mean N(0, 0.2), running
    variance in [0.5, 2.0], so eval-mode BN is a genuine affine map; the last BN of every residual branch is
    scaled by 0.5 so the activations stay of order one through 16 blocks.
    """
    rng = np.random.default_rng([seed, depth])
    out: dict[str, np.ndarray] = {}
    last_bn = "bn3" if _LAYOUT[depth][0] else "bn2"
    for kind, name, shape in _module_shapes(depth, num_classes):
        if kind == "conv":
            fan_in = shape[1] * shape[2] * shape[3]
            out[f"{name}.weight"] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        elif kind == "bn":
            scale = 0.5 if name.endswith(last_bn) else 1.0
            out[f"{name}.weight"] = (scale * rng.uniform(0.5, 1.5, shape)).astype(np.float32)
            out[f"{name}.bias"] = rng.normal(0.0, 0.1, shape).astype(np.float32)
            out[f"{name}.running_mean"] = rng.normal(0.0, 0.2, shape).astype(np.float32)
            out[f"{name}.running_var"] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
            out[f"{name}.num_batches_tracked"] = np.array(int(rng.integers(1, 10**6)), np.int64)
        else:
            out[f"{name}.weight"] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
            out[f"{name}.bias"] = rng.normal(0.0, 0.1, shape[:1]).astype(np.float32)
    return out


def images(seed: int = SEED, n: int = NUM_IMAGES, size: int = IMAGE_SIZE) -> np.ndarray:
    """``n`` seeded uint8 RGB images, NHWC (smooth gradients plus noise, so they are not pure noise)."""
    rng = np.random.default_rng([seed, 12345])
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([xx, yy, (xx + yy) / 2], -1)[None]
    x = 255.0 * (0.6 * base + 0.4 * rng.uniform(0.0, 1.0, (n, size, size, 3)))
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def normalise(x: np.ndarray) -> np.ndarray:
    """``(x / 255 - mean) / std`` in float32 (NHWC), as the package's predict and torchvision's transforms do."""
    x = x.astype(np.float32) / np.float32(255.0)
    return ((x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)).astype(np.float32)


def torch_logits(depth: int, sd: dict[str, np.ndarray], x_nhwc: np.ndarray) -> np.ndarray:
    """Logits of torchvision's resnet``depth`` in eval mode with ``sd`` loaded strictly (needs torch)."""
    import torch
    import torchvision

    model = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=sd["fc.weight"].shape[0])
    ref = model.state_dict()
    mine = {k: (v.shape, str(v.dtype)) for k, v in sd.items()}
    theirs = {k: (tuple(v.shape), str(v.numpy().dtype)) for k, v in ref.items()}
    if mine != theirs:
        raise SystemExit(f"resnet{depth}: the numpy state dict differs from torchvision's: "
                         f"{sorted(set(mine.items()) ^ set(theirs.items()))[:6]}")
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy().astype(np.float32)


def main() -> None:
    """Write the reference logits of resnet18/34/50 on the seeded images (needs torch + torchvision)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(OUT), help=f"reference file to write (default {OUT})")
    args = p.parse_args()
    import torch
    import torchvision

    torch.use_deterministic_algorithms(True)
    x = normalise(images())
    out: dict[str, np.ndarray] = {}
    for depth in DEPTHS:
        out[f"logits_resnet{depth}"] = torch_logits(depth, state_dict(depth), x)
        print(f"resnet{depth}: logits {out[f'logits_resnet{depth}'].round(3).tolist()}")
    np.savez(args.out, **out, seed=np.array(SEED), image_size=np.array(IMAGE_SIZE),
             num_classes=np.array(NUM_CLASSES), torch_version=np.array(torch.__version__),
             torchvision_version=np.array(torchvision.__version__))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
