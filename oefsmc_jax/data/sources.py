"""Image sources: npz files, TFDS datasets (TensorFlow-free), scikit-learn's embedded digits and photos.

Every source returns an :class:`ImageSet` of ``uint8`` images ``[N, H, W, C]`` at the model resolution and
``int32`` labels (``-1`` where a source has no labels, e.g. an OOD pool).

``load_source(cfg)`` dispatches on ``cfg.kind``:

- ``npz``: ``path``, ``x_key`` (``'x'``), ``y_key`` (``'y'``; a missing key gives labels ``-1``),
  ``exclude_classes`` (``()``: class ids whose images are left out, read from ``class_key``, ``'y'``; e.g. the
  Tiny-ImageNet classes that are CIFAR-10 classes in meaning, for a class-disjoint OOD pool; ``indices`` then refer
  to the remaining images).
- ``tfds``: ``name``, ``split``, ``data_dir`` (``None`` = TFDS default), ``image_key`` (``'image'``),
  ``label_key`` (``'label'``; ``None`` gives labels ``-1``), ``max_examples`` (``0`` = the whole split),
  ``download`` (``False``: the prepared array_record files must already exist), ``center_crop_fraction``
  (``1.0``: the shorter side is resized to ``image_size`` and the centre is cropped; ``0.875`` gives the usual
  ImageNet evaluation crop). Records are read through ``tfds.data_source`` (random access into array_record
  files, no TensorFlow), one by one, so ``load_source(cfg, indices=...)`` decodes only the requested records
  and :func:`tfds_labels` reads only labels (the image feature is not decoded) and can cache them.
- ``digits``: scikit-learn's bundled 8x8 digits, scaled to 0-255, upsampled to ``image_size``; ``split``
  ``'train'``/``'test'`` is a stratified split with seed 0 and ``test_fraction`` (``0.4``).
- ``sklearn_photos``: ``num_images`` random square crops (``seed``, side uniform in ``[crop_min, crop_max]``)
  of scikit-learn's two sample photos, resized, grayscale by default (``grayscale``), labels ``-1``.

Common fields: ``image_size`` (int) and ``channels`` (3 or 1). Resizing uses PIL: ``BOX`` when downsampling,
``BILINEAR`` otherwise; grayscale images are replicated to 3 channels, RGB is converted to luma for 1 channel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "DataOverlapError",
    "ImageSet",
    "Source",
    "check_disjoint",
    "gather_rows",
    "image_hashes",
    "load_source",
    "npz_length",
    "open_source",
    "prepare_image",
    "source_hashes",
    "tfds_labels",
]

SOURCE_KINDS = ("npz", "tfds", "digits", "sklearn_photos")


class DataOverlapError(ValueError):
    """Two image sets that must be disjoint share identical images."""


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSet:
    """Images ``x`` (uint8 ``[N, H, W, C]``) with labels ``y`` (int32 ``[N]``, ``-1`` = unlabelled)."""

    x: np.ndarray
    y: np.ndarray
    name: str

    def __post_init__(self) -> None:
        x = np.asarray(self.x)
        y = np.asarray(self.y)
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(f"ImageSet {self.name!r}: x must be uint8 [N,H,W,C], got {x.dtype} {x.shape}")
        if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"ImageSet {self.name!r}: y must be integer [{x.shape[0]}], got {y.dtype} {y.shape}"
            )
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y.astype(np.int32, copy=False))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        x, y = f"{self.x.dtype}{list(self.x.shape)}", f"{self.y.dtype}[{len(self)}]"
        return f"ImageSet(name={self.name!r}, x={x}, y={y})"

    def take(self, idx: Sequence[int] | np.ndarray) -> ImageSet:
        """The images (and labels) at ``idx`` (integer indices in that order, or a boolean mask)."""
        idx = np.asarray(idx)
        idx = np.nonzero(idx)[0] if idx.dtype == bool else idx.astype(np.int64)
        return ImageSet(self.x[idx], self.y[idx], self.name)


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """An image source opened without reading its images: its name, length, image shape and labels, and
    ``read(indices) -> ImageSet`` that reads (and decodes, resizes) only those records.

    What :func:`open_source` returns; a run keeps OOD pools this way, so a pool larger than host memory
    (an uncompressed npz, memory-mapped, or a TFDS split) is only ever read in chunks or at the chosen indices.
    """

    name: str
    size: int
    image_shape: tuple[int, int, int]
    read: Callable[[np.ndarray], ImageSet]
    labels: np.ndarray | None = None  # int32 [size] when known without reading images
    mapped: bool = False  # images memory-mapped from disk, not held in memory

    def __len__(self) -> int:
        return self.size

    def take(self, idx: Sequence[int] | np.ndarray | None = None) -> ImageSet:
        """The records at ``idx`` (integer indices in that order, or a boolean mask; ``None`` = all)."""
        if idx is None:
            return self.read(np.arange(self.size))
        idx = np.asarray(idx)
        idx = np.nonzero(idx)[0] if idx.dtype == bool else idx
        return self.read(_check_indices(idx, self.size, self.name))

    def subset(self, idx: Sequence[int] | np.ndarray) -> Source:
        """The records at ``idx`` as a source of their own (nothing is read)."""
        idx = _check_indices(idx, self.size, self.name)
        return Source(self.name, len(idx), self.image_shape, lambda i: self.read(idx[i]),
                      None if self.labels is None else self.labels[idx], self.mapped)

    def chunks(self, size: int = 2048) -> Iterator[ImageSet]:
        """All records in order, ``size`` at a time."""
        for start in range(0, self.size, size):
            yield self.read(np.arange(start, min(start + size, self.size)))


# ----------------------------------------------------------------------------------------------------------
# config access and image preparation


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` for mappings / ConfigDicts, ``cfg.key`` for other objects; ``default`` when absent."""
    getter = getattr(cfg, "get", None)
    if callable(getter):
        return getter(key, default)
    return getattr(cfg, key, default)


def _require(cfg: Any, key: str, kind: str) -> Any:
    value = _get(cfg, key)
    if value is None:
        raise ValueError(f"source kind {kind!r} needs the field {key!r}")
    return value


def _to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """HW / HWC uint8 -> HWC with ``channels`` (1 or 3): replicate gray, drop alpha, RGB -> PIL luma."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3:
        raise ValueError(f"expected an HW or HWC image, got shape {img.shape}")
    c = img.shape[2]
    if c in (2, 4):  # gray+alpha / RGBA: drop alpha
        img, c = img[:, :, : c - 1], c - 1
    if c == channels:
        return img
    if c == 1 and channels == 3:
        return np.repeat(img, 3, axis=2)
    if c == 3 and channels == 1:
        return np.asarray(Image.fromarray(img, mode="RGB").convert("L"))[:, :, None]
    raise ValueError(f"cannot convert an image with {img.shape[2]} channels to {channels}")


def _pil_resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize HWC uint8 with PIL: BOX when the area shrinks, BILINEAR otherwise."""
    h, w, c = img.shape
    if (h, w) == (height, width):
        return img
    resample = Image.Resampling.BOX if height * width < h * w else Image.Resampling.BILINEAR
    if c == 1:
        out = Image.fromarray(img[:, :, 0], mode="L").resize((width, height), resample)
        return np.asarray(out)[:, :, None]
    out = Image.fromarray(img, mode="RGB").resize((width, height), resample)
    return np.asarray(out)


def prepare_image(
    img: np.ndarray, size: int, channels: int = 3, center_crop_fraction: float = 1.0
) -> np.ndarray:
    """One uint8 image (HW or HWC, any size) -> ``[size, size, channels]`` uint8.

    Square images are resized directly. Otherwise the shorter side is resized to
    ``round(size / center_crop_fraction)`` (aspect ratio kept) and the centre ``size x size`` is cropped
    (ImageNet style); a square image with ``center_crop_fraction < 1`` is also centre-cropped.
    """
    if not 0.0 < center_crop_fraction <= 1.0:
        raise ValueError(f"center_crop_fraction must be in (0, 1], got {center_crop_fraction}")
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {img.dtype}")
    img = _to_channels(img, channels)
    h, w = img.shape[:2]
    short = max(size, int(round(size / center_crop_fraction)))
    if h == w:
        new_h = new_w = short
    elif h < w:
        new_h, new_w = short, max(short, int(round(w * short / h)))
    else:
        new_h, new_w = max(short, int(round(h * short / w))), short
    img = _pil_resize(img, new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(img[top : top + size, left : left + size])


def _stack(images: Iterable[np.ndarray], size: int, channels: int, frac: float = 1.0) -> np.ndarray:
    out = [prepare_image(im, size, channels, frac) for im in images]
    if not out:
        return np.zeros((0, size, size, channels), np.uint8)
    return np.stack(out)


def _check_indices(indices: Sequence[int] | np.ndarray, n: int, name: str) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"{name}: indices must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]")
    return idx


# ----------------------------------------------------------------------------------------------------------
# sources


# what numpy raises for a truncated, corrupt or foreign file (a missing file stays FileNotFoundError)
_NPZ_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


def _unreadable(path: str, e: BaseException, key: str | None = None) -> ValueError:
    """One line naming the file (and the array) that numpy could not read."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= 120 else text[:117].rsplit(" ", 1)[0] + " ..."
    what = f"array {key!r} of " if key else ""
    return ValueError(f"{path}: cannot read {what}this .npz file; is it truncated or corrupt, or not an npz of "
                      f"plain arrays? ({type(e).__name__}{': ' + text if text else ''})")


def read_npz(path: str | os.PathLike, keys: Sequence[str] | None = None) -> tuple[list[str], dict[str, np.ndarray]]:
    """``(names, arrays)``: the names of all arrays of the npz at ``path`` and those of ``keys`` (default: all)
    that it has.

    A truncated, corrupt or non-npz file raises one :class:`ValueError` naming it (and the array that could not
    be read); a missing file stays a :class:`FileNotFoundError`.
    """
    path = os.fspath(path)
    try:
        f = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except _NPZ_READ_ERRORS as e:
        raise _unreadable(path, e) from e
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single {np.shape(f)} array (.npy), not an .npz archive of named arrays")
    with f:
        names, out = list(f.files), {}
        for key in dict.fromkeys(f.files if keys is None else keys):
            if key and key in f.files:
                try:
                    out[key] = f[key]
                except _NPZ_READ_ERRORS as e:
                    raise _unreadable(path, e, key) from e
    return names, out


def _npz_member(path: str, key: str, verify: bool = True) -> np.ndarray | None:
    """A read-only memory map of array ``key`` of the npz at ``path`` when it is stored uncompressed in C order
    (what ``np.savez`` writes), else ``None`` (compressed members are read whole). With ``verify`` the member's
    CRC-32 is checked first, streamed in 16 MiB reads, so a corrupt file fails as it does when read whole."""
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo(f"{key}.npy")
    except (KeyError, *_NPZ_READ_ERRORS):
        return None  # no such array, or not a readable zip: read_npz names the problem
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    try:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            head = f.read(30)
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"bad local file header for {key}.npy")
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            if verify:
                f.seek(start)
                crc, left = 0, info.file_size
                while left:
                    buf = f.read(min(left, 1 << 24))
                    if not buf:
                        raise EOFError(f"{key}.npy ends {left} bytes early")
                    crc, left = zlib.crc32(buf, crc), left - len(buf)
                if crc != info.CRC:
                    raise zipfile.BadZipFile(f"Bad CRC-32 for file '{key}.npy'")
            f.seek(start)
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                return None
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except _NPZ_READ_ERRORS as e:
        raise _unreadable(path, e, key) from e
    if fortran or dtype.hasobject or not shape or 0 in shape:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def npz_length(cfg: Any) -> int | None:
    """The number of images of an npz source without reading them: the first dimension in the ``.npy`` header of
    its image array (compressed or not), less the images of ``exclude_classes`` (whose labels are read). ``None``
    when the file cannot tell (missing array, not an npz, unreadable): loading it names the problem."""
    path = os.fspath(_require(cfg, "path", "npz"))
    x_key = _get(cfg, "x_key", "x")
    try:
        with zipfile.ZipFile(path) as z, z.open(f"{x_key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                return None
            shape = read_header(f)[0]
    except (KeyError, *_NPZ_READ_ERRORS):
        return None
    if not shape:
        return None
    exclude = [int(c) for c in (_get(cfg, "exclude_classes", ()) or ())]
    if not exclude or shape[0] == 0:
        return int(shape[0])
    class_key = _get(cfg, "class_key", "y")
    try:
        labels = read_npz(path, [class_key])[1].get(class_key)
    except _NPZ_READ_ERRORS:
        return None
    if labels is None or len(labels) != shape[0]:
        return None
    return int(np.sum(~np.isin(labels, exclude)))


def gather_rows(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``x[idx]`` for an array or a memory map. From a memory map the rows are read with plain ``pread`` calls, one
    per run of nearby rows, never through the mapping: a fault on a mapped page brings its neighbours into the
    process too (read-around), so a few hundred scattered rows would make hundreds of MiB resident."""
    if not isinstance(x, np.memmap) or idx.size == 0:
        return np.asarray(x[idx])
    shape, row = x.shape[1:], int(np.prod(x.shape[1:])) * x.dtype.itemsize
    order = np.argsort(idx, kind="stable")
    rows = idx[order]
    out = np.empty((idx.size,) + shape, x.dtype)
    runs = np.split(np.arange(idx.size), np.nonzero(np.diff(rows) > 8)[0] + 1)  # a gap of > 8 rows: a new read
    with open(x.filename, "rb", buffering=0) as f:
        for run in runs:
            lo, hi = int(rows[run[0]]), int(rows[run[-1]]) + 1
            buf = os.pread(f.fileno(), (hi - lo) * row, x.offset + lo * row)
            if len(buf) != (hi - lo) * row:
                raise ValueError(f"{x.filename}: rows {lo}-{hi - 1} lie past the end of the file (truncated?)")
            out[order[run]] = np.frombuffer(buf, x.dtype).reshape((hi - lo,) + shape)[rows[run] - lo]
    return out


def _open_npz(cfg: Any, mapped: bool) -> Source:
    path = os.fspath(_require(cfg, "path", "npz"))
    if "://" in path:  # an object-store file (gs://...) is copied to a local temporary file once, then read
        from oefsmc_jax import paths

        path = paths.local_file(path)
    x_key, y_key = _get(cfg, "x_key", "x"), _get(cfg, "y_key", "y")
    size, channels = int(_require(cfg, "image_size", "npz")), int(_get(cfg, "channels", 3))
    name = f"npz:{path}"
    exclude = [int(c) for c in (_get(cfg, "exclude_classes", ()) or ())]
    class_key = _get(cfg, "class_key", "y")
    x = _npz_member(path, x_key) if mapped else None
    names, arrays = read_npz(path, [x_key if x is None else "", y_key, class_key if exclude else ""])
    files = sorted(names)
    if x is None and x_key not in arrays:
        raise ValueError(f"{path}: no array {x_key!r} (has {files})")
    x = arrays[x_key] if x is None else x
    y = arrays[y_key] if y_key and y_key in arrays else np.full(x.shape[0] if x.ndim else 0, -1, np.int32)
    if x.ndim not in (3, 4):
        raise ValueError(f"{path}: {x_key!r} must be images [N,H,W,C] or [N,H,W], got shape {x.shape}")
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or
                           (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0))):
        raise ValueError(f"{path}: {y_key!r} must be integer class labels [N], got {y.dtype} {y.shape}")
    rows = np.arange(len(x))
    if exclude:
        if class_key not in arrays:
            raise ValueError(f"{path}: exclude_classes needs class labels under {class_key!r} (has {files})")
        keep = ~np.isin(arrays[class_key], exclude)
        if len(keep) != len(x):
            raise ValueError(f"{path}: {len(x)} images but {len(keep)} {class_key!r} labels")
        rows, y = rows[keep], y[keep]
        name = f"{name}[without {len(exclude)} classes]"
    if len(y) != len(rows):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    if x.dtype != np.uint8:
        raise ValueError(f"{path}: {x_key!r} must be uint8 images, got {x.dtype}")
    convert = (x.shape + (1,) * (x.ndim == 3))[1:] != (size, size, channels)
    if convert and x.ndim == 4 and x.shape[3] not in (1, 2, 3, 4):
        raise ValueError(f"{path}: {x_key!r} has {x.shape[3]} channels per image (shape {x.shape}); expected "
                         f"1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA)")
    y = y.astype(np.int32)

    def read(idx: np.ndarray) -> ImageSet:
        xi = gather_rows(x, rows[idx])
        if xi.ndim == 3:
            xi = xi[..., None]
        if convert:
            try:
                xi = _stack(xi, size, channels)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from e
        return ImageSet(xi, y[idx], name)

    return Source(name, len(rows), (size, size, channels), read, y, mapped=isinstance(x, np.memmap))


def _load_npz(cfg: Any, indices: np.ndarray | None) -> ImageSet:
    return _open_npz(cfg, mapped=False).take(indices)


def _open_tfds(cfg: Any, skip_image: bool = False):
    import tensorflow_datasets as tfds

    name, split = _require(cfg, "name", "tfds"), _require(cfg, "split", "tfds")
    image_key = _get(cfg, "image_key", "image")
    decoders = {image_key: tfds.decode.SkipDecoding()} if skip_image else None
    return tfds.data_source(
        name,
        split=split,
        data_dir=_get(cfg, "data_dir") or None,  # "" = the TFDS default too
        download=bool(_get(cfg, "download", False)),
        decoders=decoders,
    )


def _tfds_size(cfg: Any, ds: Any) -> int:
    max_examples = int(_get(cfg, "max_examples", 0))
    return len(ds) if max_examples <= 0 else min(max_examples, len(ds))


def _load_tfds(cfg: Any, indices: np.ndarray | None) -> ImageSet:
    size, channels = int(_require(cfg, "image_size", "tfds")), int(_get(cfg, "channels", 3))
    frac = float(_get(cfg, "center_crop_fraction", 1.0))
    image_key, label_key = _get(cfg, "image_key", "image"), _get(cfg, "label_key", "label")
    name = f"tfds:{_get(cfg, 'name')}/{_get(cfg, 'split')}"
    ds = _open_tfds(cfg)
    idx = np.arange(_tfds_size(cfg, ds)) if indices is None else _check_indices(indices, len(ds), name)
    xs, ys = [], np.full(len(idx), -1, np.int32)
    for j, i in enumerate(idx):
        ex = ds[int(i)]  # one record at a time: decodes only what is asked for
        xs.append(prepare_image(np.asarray(ex[image_key]), size, channels, frac))
        if label_key:
            ys[j] = int(ex[label_key])
    x = np.stack(xs) if xs else np.zeros((0, size, size, channels), np.uint8)
    return ImageSet(x, ys, name)


def tfds_labels(cfg: Any, cache_path: str | os.PathLike | None = None) -> np.ndarray:
    """Labels (int32) of a TFDS split without decoding its images; optionally cached in an ``.npz`` file.

    The image feature is opened with ``tfds.decode.SkipDecoding``. (``tfds.testing.mock_data`` cannot serve
    that without TensorFlow: for any ``decoders`` it PNG-encodes its fake images with ``tf.image.encode_png``;
    use a real array_record dataset to test this function.)

    Covers the same records as ``load_source(cfg)`` (the first ``max_examples`` when that is > 0), so its
    positions are valid ``indices`` for ``load_source``. ``cache_path`` (or ``cfg.labels_cache``) is read when
    it exists and belongs to the same dataset/split/size, and written (atomically) otherwise.
    """
    cache_path = cache_path if cache_path is not None else _get(cfg, "labels_cache")
    label_key = _get(cfg, "label_key", "label")
    tag = f"{_get(cfg, 'name')}/{_get(cfg, 'split')}/{int(_get(cfg, 'max_examples', 0))}/{label_key}"
    from oefsmc_jax import paths

    cache_path = paths.as_path(cache_path) if cache_path else None
    if cache_path is not None and cache_path.exists():
        with np.load(io.BytesIO(cache_path.read_bytes()), allow_pickle=False) as f:
            if "tag" in f.files and str(f["tag"]) == tag:
                return f["y"].astype(np.int32)
    ds = _open_tfds(cfg, skip_image=True)
    n = _tfds_size(cfg, ds)
    if label_key:
        y = np.fromiter((int(ds[i][label_key]) for i in range(n)), dtype=np.int32, count=n)
    else:
        y = np.full(n, -1, np.int32)
    if cache_path is not None:
        buf = io.BytesIO()
        np.savez(buf, y=y, tag=np.array(tag))
        paths.write_bytes_atomic(cache_path, buf.getvalue())
    return y


def _load_digits(cfg: Any, indices: np.ndarray | None) -> ImageSet:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    size, channels = int(_require(cfg, "image_size", "digits")), int(_get(cfg, "channels", 3))
    split = _get(cfg, "split", "train")
    if split not in ("train", "test"):
        raise ValueError(f"digits: split must be 'train' or 'test', got {split!r}")
    test_fraction = float(_get(cfg, "test_fraction", 0.4))
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # [1797, 8, 8]
    labels = digits.target.astype(np.int32)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=0, stratify=labels
    )
    sel = np.sort(train_idx if split == "train" else test_idx)
    if indices is not None:
        sel = sel[_check_indices(indices, len(sel), f"digits/{split}")]
    return ImageSet(_stack(images[sel], size, channels), labels[sel], f"digits/{split}")


def _load_sklearn_photos(cfg: Any, indices: np.ndarray | None) -> ImageSet:
    from sklearn.datasets import load_sample_images

    size, channels = int(_require(cfg, "image_size", "sklearn_photos")), int(_get(cfg, "channels", 3))
    num_images, seed = int(_get(cfg, "num_images", 1000)), int(_get(cfg, "seed", 0))
    crop_min, crop_max = int(_get(cfg, "crop_min", 24)), int(_get(cfg, "crop_max", 160))
    grayscale = bool(_get(cfg, "grayscale", True))
    photos = [np.asarray(im, dtype=np.uint8) for im in load_sample_images().images]  # 2 x [427, 640, 3]
    max_side = min(min(p.shape[:2]) for p in photos)
    if not 1 <= crop_min <= crop_max <= max_side:
        raise ValueError(
            f"sklearn_photos: need 1 <= crop_min <= crop_max <= {max_side}, got [{crop_min}, {crop_max}]"
        )
    if num_images < 0:
        raise ValueError(f"sklearn_photos: num_images must be >= 0, got {num_images}")
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(photos), size=num_images)
    sides = rng.integers(crop_min, crop_max + 1, size=num_images)
    u = rng.random((num_images, 2))
    crops = []
    for p, s, (uy, ux) in zip(which, sides, u):
        h, w = photos[p].shape[:2]
        top, left = int(uy * (h - s + 1)), int(ux * (w - s + 1))
        crop = photos[p][top : top + s, left : left + s]
        if grayscale:
            crop = _to_channels(crop, 1)
        crops.append(crop)
    sel = np.arange(num_images) if indices is None else _check_indices(indices, num_images, "sklearn_photos")
    x = _stack([crops[i] for i in sel], size, channels)
    return ImageSet(x, np.full(len(sel), -1, np.int32), f"sklearn_photos/seed{seed}")


_LOADERS = {
    "npz": _load_npz,
    "tfds": _load_tfds,
    "digits": _load_digits,
    "sklearn_photos": _load_sklearn_photos,
}


def open_source(cfg: Any) -> Source:
    """Open the image source described by ``cfg`` without reading its images where it can: an npz whose image
    array is stored uncompressed (``np.savez``) is memory-mapped after a streamed CRC check, a TFDS split reads
    records on demand; ``digits``, ``sklearn_photos`` and compressed npz files are read whole."""
    kind = _get(cfg, "kind")
    if kind not in _LOADERS:
        raise ValueError(f"source kind must be one of {', '.join(SOURCE_KINDS)}; got {kind!r}")
    if kind == "npz":
        return _open_npz(cfg, mapped=True)
    if kind == "tfds":
        size, channels = int(_require(cfg, "image_size", "tfds")), int(_get(cfg, "channels", 3))
        n = _tfds_size(cfg, _open_tfds(cfg))
        return Source(f"tfds:{_get(cfg, 'name')}/{_get(cfg, 'split')}", n, (size, size, channels),
                      lambda idx: _load_tfds(cfg, idx))
    full = load_source(cfg)
    return Source(full.name, len(full), full.x.shape[1:], full.take, full.y)


def load_source(cfg: Any, indices: Sequence[int] | np.ndarray | None = None) -> ImageSet:
    """Load the image source described by ``cfg`` (see the module docstring for the fields).

    ``indices`` (optional) selects records of the source, in that order; for TFDS only those records are read
    and decoded.
    """
    kind = _get(cfg, "kind")
    if kind not in _LOADERS:
        raise ValueError(f"source kind must be one of {', '.join(SOURCE_KINDS)}; got {kind!r}")
    return _LOADERS[kind](cfg, None if indices is None else np.asarray(indices))


# ----------------------------------------------------------------------------------------------------------
# overlap checks


def image_hashes(x: np.ndarray) -> np.ndarray:
    """One 64-bit content hash (blake2b of shape, dtype and bytes) per image of ``x`` ``[N, ...]``: uint64."""
    x = np.asarray(x)
    out = np.empty(x.shape[0], np.uint64)
    shape_tag = repr((x.shape[1:], x.dtype.str)).encode()
    for i in range(x.shape[0]):
        h = hashlib.blake2b(shape_tag, digest_size=8)
        h.update(np.ascontiguousarray(x[i]).tobytes())
        out[i] = int.from_bytes(h.digest(), "little")
    return out


def source_hashes(src: ImageSet | Source, chunk: int = 4096) -> np.ndarray:
    """:func:`image_hashes` of every image of ``src``; a :class:`Source` is read ``chunk`` images at a time."""
    if isinstance(src, ImageSet):
        return image_hashes(src.x)
    parts = [image_hashes(part.x) for part in src.chunks(chunk)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


def check_disjoint(a: ImageSet | Source, b: ImageSet, what: str, a_hashes: np.ndarray | None = None) -> None:
    """Raise :class:`DataOverlapError` when an image of ``a`` also appears (byte-identical) in ``b``.

    The message is one line, ``"{what}: N identical images (...); use a disjoint source"``, where N counts the
    images of ``a`` found in ``b``. Sets of different image shapes cannot share images and always pass. ``a`` may
    be a :class:`Source` (read in chunks), and ``a_hashes`` its :func:`source_hashes` when already computed.
    """
    if len(a) == 0 or len(b) == 0:
        return
    a_shape = a.x.shape[1:] if isinstance(a, ImageSet) else tuple(a.image_shape)
    if a_shape != b.x.shape[1:]:
        return  # different resolutions cannot hold identical images
    a_hashes = source_hashes(a) if a_hashes is None else a_hashes
    shared = int(np.isin(a_hashes, image_hashes(b.x)).sum())
    if shared:
        raise DataOverlapError(
            f"{what}: {shared} identical image{'s' if shared != 1 else ''} "
            f"(of {len(a)} in {a.name} found in {b.name}); use a disjoint source"
        )
