"""The benchmarks' shared workload: settings, random image pools and a teacher with its pruned, shrunk student.

Used by ``step_throughput.py`` (JAX against PyTorch) and ``grid_throughput.py`` (many runs at once); it imports no
PyTorch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from oefsmc_jax.models import ArchSpec, build_model, cifar_resnet_spec, l1_prune, shrink  # noqa: E402
from oefsmc_jax.oe import complementary  # noqa: E402

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10
# Flax momentum of every BatchNorm of oefsmc_jax.models.resnet (PyTorch momentum 0.1): used to read the batch
# statistics back out of one train-mode update when calibrating the random teacher.
FLAX_BN_MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class Workload:
    """Settings shared by both backends."""

    batch_id: int
    batch_ood: int
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    kd_gamma: float = 0.9
    tau: float = 4.0
    lambda_jd: float = 1.0
    eta: float = 0.1
    pad: int = 4
    mean: tuple[float, ...] = CIFAR_MEAN
    std: tuple[float, ...] = CIFAR_STD

    @property
    def images_per_step(self) -> int:
        """Images the student sees per step (ID + OOD)."""
        return self.batch_id + self.batch_ood


# ------------------------------------------------------------------------------------------ data and models
def make_host_data(n_max: int, rho: float, n_ood: int, seed: int) -> dict[str, np.ndarray]:
    """Random uint8 NHWC pools: a class-imbalanced ID set (``n_max`` down to ``n_max / rho`` per class,
    exponential profile) and an OOD set, plus the complementary distribution ``gamma`` and the regulariser
    weights."""
    rng = np.random.default_rng(seed)
    profile = rho ** (-np.arange(NUM_CLASSES) / (NUM_CLASSES - 1))
    counts = np.maximum(1, np.round(n_max * profile)).astype(np.int64)
    y = np.repeat(np.arange(NUM_CLASSES), counts).astype(np.int32)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    x_ood = rng.integers(0, 256, (n_ood, 32, 32, 3), dtype=np.uint8)
    gamma = np.asarray(complementary.complementary_distribution(jnp.asarray(counts)), np.float32)
    reg_w = np.asarray(complementary.class_weights(jnp.asarray(gamma)), np.float32)
    return {"x_id": x, "y_id": y, "x_ood": x_ood, "gamma": gamma, "reg_weights": reg_w, "counts": counts}


def calibrate_batch_stats(spec: ArchSpec, variables: dict, images: np.ndarray, wl: Workload) -> dict:
    """Set every BatchNorm running mean/var of ``variables`` to the batch statistics of ``images``.

    One train-mode update gives ``new = m * old + (1 - m) * batch``, so ``batch = (new - m * old) / (1 - m)``.
    """
    model = build_model(spec)
    x = (jnp.asarray(images, jnp.float32) / 255.0 - jnp.asarray(wl.mean)) / jnp.asarray(wl.std)
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1]["batch_stats"])
    new = fwd(variables, x)
    m = FLAX_BN_MOMENTUM
    stats = jax.tree.map(lambda a, b: (a - m * b) / (1.0 - m), new, variables["batch_stats"])
    return jax.device_get({**variables, "batch_stats": stats})


def make_teacher_and_student(depth: int, prune_ratio: float, images: np.ndarray, wl: Workload, seed: int,
                             teacher_npz: str | None = None) -> tuple[ArchSpec, dict, ArchSpec, dict]:
    """Teacher (random + calibrated BN statistics, or an akamaster .npz) and its L1-pruned, shrunk student."""
    if teacher_npz:
        from oefsmc_jax.convert import load_akamaster_npz  # only needed for this option

        t_spec, t_vars = load_akamaster_npz(teacher_npz)
        t_vars = jax.device_get(t_vars)
    else:
        t_spec = cifar_resnet_spec(depth, NUM_CLASSES, shortcut="A")
        t_vars = build_model(t_spec).init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)), train=False)
        t_vars = calibrate_batch_stats(t_spec, t_vars, images, wl)
    m_spec, m_vars = l1_prune(t_spec, t_vars, prune_ratio)
    s_spec, s_vars = shrink(m_spec, m_vars)
    return t_spec, t_vars, s_spec, jax.device_get(s_vars)
