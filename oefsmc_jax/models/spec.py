"""Architecture specifications: a small, JSON-serialisable description of every model we build.

An :class:`ArchSpec` fully determines the shapes of a model's variables, so pruning ("surgery") can change
the spec (narrower blocks, removed blocks) and :func:`oefsmc_jax.models.build_model` builds the smaller net.

Conventions
-----------
* Stages are indexed ``s`` and blocks inside a stage ``b``; indices always refer to the ORIGINAL
  architecture, so a removed block (``kept[s][b] is False``) leaves a gap and names stay stable.
* ResNets: ``stage_widths[s]`` is the output width of every block of stage ``s`` (bottleneck: 4 * planes);
  ``stage_strides[s]`` is the stride of the first block of the stage; ``inner_widths[s][b]`` are the
  internal widths of the block: ``(w,)`` for a basic block, ``(w1, w2)`` for a bottleneck.
* VGG: each conv layer is a "block" with ``inner_widths[s][b] == (out_width,)``, a stage is a group of
  convs followed by a 2x2 max-pool when ``stage_strides[s] == 2`` (no pool when 1).  ``stage_widths[s]``
  mirrors the width of the last conv of the stage (kept in sync by :meth:`ArchSpec.with_inner_widths`;
  the inner widths are authoritative).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

FAMILIES = ("cifar_resnet", "imagenet_resnet", "vgg")
BLOCKS = ("basic", "bottleneck", "conv")
SHORTCUTS = ("A", "B")
_N_INNER = {"basic": 1, "bottleneck": 2, "conv": 1}


def _int_tuple(x: Any, name: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in x)
    except TypeError as e:
        raise ValueError(f"{name} must be a sequence of ints, got {x!r}") from e
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """Frozen, hashable, JSON-serialisable description of a CIFAR/ImageNet ResNet or a VGG.

    Lists passed to the constructor are normalised to tuples, so ``from_dict(json.loads(...))`` works.
    """

    family: str
    num_classes: int
    in_channels: int = 3
    block: str
    stem_width: int
    stage_widths: tuple[int, ...]
    stage_strides: tuple[int, ...]
    inner_widths: tuple[tuple[tuple[int, ...], ...], ...]
    kept: tuple[tuple[bool, ...], ...]
    shortcut: str = "A"
    vgg_classifier: tuple[int, ...] = ()
    # BatchNorm modules of every block (e.g. ("bn1", "bn2"); VGG ("bn",)) followed by a square 1x1 correction
    # ``q_<bn>`` (FSKD's Q kept as its own layer while fine-tuning; folded at export, then empty again)
    corrections: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("num_classes", int(self.num_classes))
        set_("in_channels", int(self.in_channels))
        set_("stem_width", int(self.stem_width))
        set_("stage_widths", _int_tuple(self.stage_widths, "stage_widths"))
        set_("stage_strides", _int_tuple(self.stage_strides, "stage_strides"))
        set_("vgg_classifier", _int_tuple(self.vgg_classifier, "vgg_classifier"))
        set_("corrections", tuple(str(c) for c in self.corrections))
        try:
            inner = tuple(tuple(_int_tuple(w, "inner_widths") for w in st) for st in self.inner_widths)
            kept = tuple(tuple(st) for st in self.kept)
        except TypeError as e:
            raise ValueError("inner_widths must be [stage][block][j] ints, kept [stage][block] bools") from e
        set_("inner_widths", inner)
        for st in kept:
            for k in st:
                if not isinstance(k, (bool, np.bool_)):
                    raise ValueError(f"kept entries must be bools, got {k!r}")
        set_("kept", tuple(tuple(bool(k) for k in st) for st in kept))
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")
        if (self.family == "vgg") != (self.block == "conv"):
            raise ValueError(f"block {self.block!r} is not valid for family {self.family!r}")
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {self.shortcut!r}")
        if self.num_classes < 1 or self.in_channels < 1:
            raise ValueError("num_classes and in_channels must be >= 1")
        n = len(self.stage_widths)
        if n == 0:
            raise ValueError("need at least one stage")
        if not (len(self.stage_strides) == len(self.inner_widths) == len(self.kept) == n):
            raise ValueError(
                "stage_widths, stage_strides, inner_widths and kept must have one entry per stage"
            )
        if self.family == "vgg":
            if self.stem_width != 0:
                raise ValueError("vgg has no stem: stem_width must be 0")
            if any(st not in (1, 2) for st in self.stage_strides):
                raise ValueError("vgg stage_strides must be 1 (no pool) or 2 (2x2 max-pool)")
        else:
            if self.stem_width < 1:
                raise ValueError("ResNets need stem_width >= 1")
            if self.vgg_classifier:
                raise ValueError("vgg_classifier is only valid for family 'vgg'")
            if any(st < 1 for st in self.stage_strides):
                raise ValueError("stage_strides must be >= 1")
        if any(w < 1 for w in self.stage_widths + self.vgg_classifier):
            raise ValueError("all widths must be >= 1")
        for s in range(n):
            if len(self.inner_widths[s]) != len(self.kept[s]) or not self.kept[s]:
                raise ValueError(f"stage {s}: inner_widths and kept must list the same (>0) number of blocks")
            for b, w in enumerate(self.inner_widths[s]):
                if len(w) != _N_INNER[self.block]:
                    raise ValueError(f"block ({s},{b}): a {self.block} block needs {_N_INNER[self.block]} "
                                     f"inner widths, got {w}")
                if any(x < 1 for x in w):
                    raise ValueError(f"block ({s},{b}): inner widths must be >= 1, got {w}")
        for s in range(n):
            for b in range(len(self.kept[s])):
                if self.family != "vgg" and self.shortcut == "A":
                    if self.block_out_width(s, b) < self.block_in_width(s, b):
                        raise ValueError(f"block ({s},{b}): option-A shortcut cannot reduce channels")
                if not self.kept[s][b] and not self.identity_shortcut(s, b):
                    raise ValueError(
                        f"block ({s},{b}) (s{s}b{b}) has no identity shortcut and cannot be removed"
                    )

    # ------------------------------------------------------------------ structure helpers
    @property
    def num_stages(self) -> int:
        """Number of stages."""
        return len(self.stage_widths)

    @property
    def is_resnet(self) -> bool:
        """True for the residual families."""
        return self.family != "vgg"

    def block_name(self, stage: int, block: int) -> str:
        """Flax module name of block (stage, block): ``s{s}b{b}`` for ResNets, ``s{s}c{b}`` for VGG."""
        return f"s{stage}{'b' if self.is_resnet else 'c'}{block}"

    def blocks(self) -> Iterator[tuple[int, int]]:
        """Iterate (stage, block) over kept blocks in forward order."""
        for s, st in enumerate(self.kept):
            for b, k in enumerate(st):
                if k:
                    yield s, b

    def all_blocks(self) -> Iterator[tuple[int, int]]:
        """Iterate (stage, block) over all blocks of the original architecture, kept or not."""
        for s, st in enumerate(self.kept):
            for b in range(len(st)):
                yield s, b

    def block_in_width(self, stage: int, block: int) -> int:
        """Number of channels entering block (stage, block)."""
        if self.is_resnet:
            if block > 0:
                return self.stage_widths[stage]
            return self.stem_width if stage == 0 else self.stage_widths[stage - 1]
        if block > 0:
            return self.inner_widths[stage][block - 1][0]
        return self.in_channels if stage == 0 else self.inner_widths[stage - 1][-1][0]

    def block_out_width(self, stage: int, block: int) -> int:
        """Number of channels leaving block (stage, block)."""
        if self.is_resnet:
            return self.stage_widths[stage]
        return self.inner_widths[stage][block][0]

    def block_stride(self, stage: int, block: int) -> int:
        """Spatial stride of block (stage, block) (VGG convs: 1; pooling is per stage)."""
        if self.is_resnet and block == 0:
            return self.stage_strides[stage]
        return 1

    def identity_shortcut(self, stage: int, block: int) -> bool:
        """True if the block's shortcut is the identity (stride 1, in width == out width); False for VGG."""
        if not self.is_resnet:
            return False
        same_width = self.block_in_width(stage, block) == self.block_out_width(stage, block)
        return self.block_stride(stage, block) == 1 and same_width

    @property
    def feature_width(self) -> int:
        """Channels of the 'features' map (input of the classifier)."""
        return self.stage_widths[-1] if self.is_resnet else self.inner_widths[-1][-1][0]

    def with_inner_widths(self, inner_widths: Sequence[Sequence[Sequence[int]]]) -> ArchSpec:
        """Copy with new inner widths (VGG: ``stage_widths`` follows the last conv of each stage)."""
        if self.is_resnet:
            return dataclasses.replace(self, inner_widths=inner_widths)
        new = dataclasses.replace(self, inner_widths=inner_widths)
        return dataclasses.replace(new, stage_widths=tuple(st[-1][0] for st in new.inner_widths))

    def with_kept(self, kept: Sequence[Sequence[bool]]) -> ArchSpec:
        """Copy with a new ``kept`` pattern."""
        return dataclasses.replace(self, kept=kept)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (tuples stay tuples; json turns them into lists); ``corrections`` only when set, so a
        spec without them serialises as before the field existed."""
        d = dataclasses.asdict(self)
        if not d["corrections"]:
            del d["corrections"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ArchSpec:
        """Inverse of :meth:`to_dict` (accepts lists, e.g. from JSON)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ArchSpec fields: {sorted(unknown)}")
        return cls(**dict(d))

    def to_json(self) -> str:
        """JSON string form."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> ArchSpec:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(s))


# ---------------------------------------------------------------------- constructors
@dataclasses.dataclass(frozen=True)
class ResNetStages:
    """The stages of a ResNet: ``blocks[s]`` blocks of inner width ``planes[s]`` (stage width: planes,
    bottleneck 4*planes), the first of them with stride ``strides[s]``."""

    blocks: Sequence[int]
    planes: Sequence[int]
    strides: Sequence[int]

    def __post_init__(self) -> None:
        for name in ("blocks", "planes", "strides"):  # tuples, so the value is hashable
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.blocks) != len(self.planes) or len(self.planes) != len(self.strides):
            raise ValueError("blocks, planes and strides must have the same length")
        if any(n < 1 for n in self.blocks):
            raise ValueError("every stage needs at least one block")


def resnet_spec(
    *,
    family: str,
    block: str,
    stages: ResNetStages,
    stem_width: int,
    shortcut: str,
    num_classes: int,
    in_channels: int = 3,
) -> ArchSpec:
    """Generic ResNet spec with the given ``stages``."""
    blocks_per_stage, planes = stages.blocks, stages.planes
    exp = 4 if block == "bottleneck" else 1
    inner_one = (lambda p: (p, p)) if block == "bottleneck" else (lambda p: (p,))
    return ArchSpec(
        family=family,
        num_classes=num_classes,
        in_channels=in_channels,
        block=block,
        stem_width=stem_width,
        stage_widths=tuple(exp * p for p in planes),
        stage_strides=stages.strides,
        inner_widths=tuple(tuple(inner_one(p) for _ in range(n)) for p, n in zip(planes, blocks_per_stage)),
        kept=tuple(tuple(True for _ in range(n)) for n in blocks_per_stage),
        shortcut=shortcut,
    )


def cifar_resnet_spec(
    depth: int, num_classes: int = 10, shortcut: str = "A", widths: Sequence[int] = (16, 32, 64)
) -> ArchSpec:
    """CIFAR ResNet-depth (He et al. 2016, depth = 6n + 2: 8, 14, 20, 32, 44, 56, 110, ...)."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(
            f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}"
        )
    widths = tuple(widths)
    if len(widths) != 3:
        raise ValueError(f"CIFAR ResNets have 3 stages, got widths={widths}")
    n = (depth - 2) // 6
    return resnet_spec(
        family="cifar_resnet", block="basic", stages=ResNetStages(blocks=(n, n, n), planes=widths, strides=(1, 2, 2)),
        stem_width=widths[0], shortcut=shortcut, num_classes=num_classes,
    )


_IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}


def imagenet_resnet_spec(
    depth: int,
    num_classes: int = 1000,
    widths: Sequence[int] = (64, 128, 256, 512),
    stem_width: int | None = None,
) -> ArchSpec:
    """torchvision ResNet-18/34/50 (v1.5, option-B projection shortcuts); ``widths`` are the planes."""
    if depth not in _IMAGENET_DEPTHS:
        raise ValueError(f"ImageNet ResNet depth must be one of {sorted(_IMAGENET_DEPTHS)}, got {depth}")
    block, nblocks = _IMAGENET_DEPTHS[depth]
    widths = tuple(widths)
    if len(widths) != 4:
        raise ValueError(f"ImageNet ResNets have 4 stages, got widths={widths}")
    return resnet_spec(
        family="imagenet_resnet", block=block,
        stages=ResNetStages(blocks=nblocks, planes=widths, strides=(1, 2, 2, 2)),
        stem_width=widths[0] if stem_width is None else stem_width, shortcut="B", num_classes=num_classes,
    )


def vgg_spec(
    cfg: Sequence[int | str], num_classes: int = 10, classifier: Sequence[int] = (), in_channels: int = 3
) -> ArchSpec:
    """VGG from a torchvision-style cfg (ints: 3x3 conv+BN+ReLU widths; 'M': 2x2 max-pool ending a stage)."""
    stages: list[list[int]] = [[]]
    strides: list[int] = []
    for item in cfg:
        if item == "M":
            if not stages[-1]:
                raise ValueError("vgg cfg: every 'M' must follow at least one conv")
            strides.append(2)
            stages.append([])
        elif isinstance(item, int) and not isinstance(item, bool):
            stages[-1].append(item)
        else:
            raise ValueError(f"vgg cfg entries must be ints or 'M', got {item!r}")
    if stages[-1]:
        strides.append(1)
    else:
        stages.pop()
    if not stages:
        raise ValueError("vgg cfg has no conv layers")
    return ArchSpec(
        family="vgg", num_classes=num_classes, in_channels=in_channels, block="conv", stem_width=0,
        stage_widths=tuple(st[-1] for st in stages), stage_strides=tuple(strides),
        inner_widths=tuple(tuple((w,) for w in st) for st in stages),
        kept=tuple(tuple(True for _ in st) for st in stages), shortcut="A", vgg_classifier=tuple(classifier),
    )


def vgg16_spec(num_classes: int = 10, widths: Sequence[int] = (64, 128, 256, 512, 512)) -> ArchSpec:
    """CIFAR VGG-16 with BN (cfg 64,64,M,128,128,M,256x3,M,512x3,M,512x3,M; one Linear 512->K)."""
    widths = tuple(widths)
    if len(widths) != 5:
        raise ValueError(f"VGG-16 has 5 stages, got widths={widths}")
    reps = (2, 2, 3, 3, 3)
    cfg: list[int | str] = []
    for w, r in zip(widths, reps):
        cfg += [w] * r + ["M"]
    return vgg_spec(cfg, num_classes=num_classes)


# ---------------------------------------------------------------------- architecture names (config.arch.name)
_FIXED_ARCH_NAMES = ("vgg16", *(f"imagenet_resnet{d}" for d in _IMAGENET_DEPTHS))
#: what ``config.arch.name`` may be: a CIFAR ResNet of any depth 6n+2, VGG-16, or a torchvision ImageNet ResNet
ARCH_NAMES: tuple[str, ...] = ("resnet<6n+2> (e.g. resnet20, resnet32, resnet44, resnet56, resnet110)",
                               *_FIXED_ARCH_NAMES)


def check_arch_name(name: str) -> None:
    """Raise a one-line :class:`ValueError` unless ``name`` is one of :data:`ARCH_NAMES`."""
    m = re.fullmatch(r"resnet(\d+)", name)
    if m:
        depth = int(m.group(1))
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110...), "
                             f"got {depth}")
        return
    if name in _FIXED_ARCH_NAMES:
        return
    raise ValueError(f"unknown architecture {name!r}; allowed: {', '.join(ARCH_NAMES)}")


def build_arch(arch: Any, num_classes: int) -> ArchSpec:
    """The ``ArchSpec`` that ``config.arch`` names (``name``, see :data:`ARCH_NAMES`; a CIFAR ResNet also reads
    ``shortcut`` and ``widths``), with ``num_classes`` outputs."""
    name = arch.name
    if name.startswith("imagenet_resnet"):
        return imagenet_resnet_spec(int(name[len("imagenet_resnet"):]), num_classes)
    if name == "vgg16":
        return vgg16_spec(num_classes)
    if name.startswith("resnet"):
        return cifar_resnet_spec(int(name[len("resnet"):]), num_classes, shortcut=arch.shortcut,
                                 widths=tuple(arch.widths))
    raise ValueError(f"arch.name: unknown architecture {name!r}")
