"""The data-parallel fine-tuning step of OE-FSMC (method.md §4), compiled once per run.

One call of the step, all inside a single ``jax.jit``:

1. Inside ``jax.shard_map`` over the ``data`` axis, every device draws from ``fold_in(rng, step)`` the *global*
   batch's ID indices (uniform from ``D``), OOD indices (uniform from ``D_o``), one augmentation key per image and
   the OOD images' complementary labels ``y~ ~ Categorical(Gamma)``, and keeps its own slice. Drawing globally
   (per example) makes the result independent of the device count, and no communication is needed for it.
2. The per-device step then augments and normalises the local images, runs
   the teacher in eval mode and the student in train mode on ``ID ∪ OOD`` (BatchNorm statistics synced with
   ``lax.pmean`` across devices), compute ``L = L_base + lambda_jd * L_jd + eta * R``, ``lax.pmean`` the gradients,
   apply the optax update and re-apply the pruning masks to parameters and optimizer moments. A non-finite loss or
   gradient skips the update everywhere (counted in the state; ``training.loop`` stops after too many in a row).

The few-sample sets are tiny, so by default they live on every device and the step draws its batch there; a pool too
large to replicate is fed by the host instead (``StepConfig.host_batches``, ``training/feed.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from oefsmc_jax import losses
from oefsmc_jax.data.augment import augment_batch, normalize
from oefsmc_jax.kernels import cpu_conv
from oefsmc_jax.training import xla_cpu
from oefsmc_jax.training.parallel import AXIS, num_devices, replicated, shard_batch
from oefsmc_jax.training.recipe import Recipe
from oefsmc_jax.training.xla_cpu import mesh_platform

BN_MODES = ("joint", "separate")


def _no_trace_check(fn: Callable) -> Callable:
    return fn


#: applied to the Python bodies of the train step and of the eval forward before they are jitted, whenever one is
#: built: the identity, except in tests that install ``chex.assert_max_traces`` here (tests/test_chex.py) to show
#: that runs of one shape (seeds, arms) trace each body once
trace_check: Callable[[Callable], Callable] = _no_trace_check


@flax.struct.dataclass
class TrainState:
    """Everything that changes during fine-tuning (checkpointed as one pytree)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key; step keys are fold_in(rng, step)
    nonfinite: jax.Array  # int32: consecutive steps skipped for a non-finite loss or gradient
    skipped: jax.Array  # int32: all steps skipped so far


@flax.struct.dataclass
class StepData:
    """Device-resident training data and constants of one run (replicated on every device)."""

    x_id: jax.Array  # uint8 [n, H, W, C]
    y_id: jax.Array  # int32 [n]
    x_ood: jax.Array | None  # uint8 [m, H, W, C] or None when OE is off
    id_probs: jax.Array | None  # sampling probabilities of the ID images, None = uniform
    gamma: jax.Array  # complementary distribution [K]
    reg_weights: jax.Array  # class-dependent weights w_k = K * Gamma_k  [K]
    y_ood: jax.Array | None = None  # fixed labels of the OOD images for R; None = drawn from Gamma every step


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the train step (a change recompiles)."""

    batch_id: int
    batch_ood: int = 0
    pad: int = 4
    flip: bool = True
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    lambda_jd: float = 1.0
    eta: float = 0.1
    tau: float = 4.0
    bn_mode: str = "joint"  # 'joint': BN sees ID and OOD together; 'separate': BN statistics from ID only
    # False: the whole ID set and OOD pool live on every device and the step draws its batch from them.
    # True: the host draws the same indices (host_draw), gathers the step's images and passes only those
    # (StepData then holds this step's global batch; training.feed.HostFeeder): for pools too large to replicate.
    host_batches: bool = False
    # how the step is compiled (resolved modes, not '' : the run resolves the config's): the XLA:CPU fusion mode
    # of training/xla_cpu.py (its compiler options) and the filter-gradient mode of kernels/cpu_conv.py ('kernel':
    # on a CPU mesh the step's models call the kernel's convolution; elsewhere XLA's)
    cpu_fusion: str = xla_cpu.DEFAULT
    cpu_wgrad: str = cpu_conv.DEFAULT


@dataclasses.dataclass(frozen=True)
class GroupStep:
    """A grouped train step: whether its runs share one teacher, and how it runs them (``impl``: one of
    :data:`GROUP_IMPLS`; :func:`make_train_step` resolves ``auto`` for the mesh's platform)."""

    shared_teacher: bool
    impl: str


#: sets of at least this many images are sampled with replacement (``randint``, O(batch) per step) instead of without
#: (``choice``, a permutation of the whole set every step); a batch of B then repeats an image with probability
#: below B^2 / (2 n): 0.8 % for 32 of 65,536, 0.05 % for 32 of a million
LARGE_SET = 65536


def draw_indices(key: jax.Array, n: int, b: int, probs: jax.Array | None = None) -> jax.Array:
    """``b`` indices into a set of ``n`` images: by ``probs`` (with replacement) when given; else uniform, without
    replacement when ``b <= n < LARGE_SET``, with replacement otherwise. Used by the step and :func:`host_draw`."""
    if probs is not None:
        chex.assert_shape(probs, (n,))
    if probs is not None or b > n:
        return jax.random.choice(key, n, (b,), replace=True, p=probs)
    if n >= LARGE_SET:
        return jax.random.randint(key, (b,), 0, n)
    return jax.random.choice(key, n, (b,), replace=False)


def host_draw(cfg: StepConfig, rng: np.ndarray, step: int, n: int, m: int,
              id_probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The global ID and OOD indices the step draws at ``step`` from a set of ``n`` ID and a pool of ``m`` OOD images
    (``m = 0``: none), computed on the host with the same keys and calls as inside the step, so a run fed by
    :class:`oefsmc_jax.training.feed.HostFeeder` sees exactly the images of a run with the data on the device."""
    return _host_draw(np.asarray(rng, np.uint32), np.int32(step), n, m, cfg.batch_id, cfg.batch_ood,
                      None if id_probs is None else np.asarray(id_probs, np.float32))


def _host_draw(rng, step, n, m, batch_id, batch_ood, id_probs):
    cpu = jax.devices("cpu")[0]
    fn = _host_draw_fn(n, m, batch_id, batch_ood, id_probs is not None)
    args = jax.device_put((rng, step) + ((id_probs,) if id_probs is not None else ()), cpu)
    idx, idx_ood = fn(*args)
    return np.asarray(idx), (np.asarray(idx_ood) if m else None)


@functools.lru_cache(maxsize=16)
def _host_draw_fn(n: int, m: int, batch_id: int, batch_ood: int, weighted: bool) -> Callable:
    def draw(rng, step, *probs):
        key = jax.random.fold_in(rng, step)
        k_idx, k_idx_ood, _, _, _ = jax.random.split(key, 5)
        idx = draw_indices(k_idx, n, batch_id, probs[0] if weighted else None)
        idx_ood = draw_indices(k_idx_ood, m, batch_ood) if m else jnp.zeros((0,), jnp.int32)
        return idx, idx_ood

    return jax.jit(draw)


def init_state(variables: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh train state for the student ``variables`` (host arrays are fine)."""
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed), nonfinite=jnp.zeros((), jnp.int32),
                      skipped=jnp.zeros((), jnp.int32))


def _path_key(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def apply_multipliers(tree: Any, params_like: Any, multipliers: Any) -> Any:
    """Multiply every leaf of ``tree`` that corresponds to a parameter by that parameter's mask multiplier.

    A leaf corresponds to a parameter when its path ends with the parameter's path and the shapes agree; this finds
    the parameter-shaped moments inside any optax state (``trace``, ``mu``, ``nu``, masked/multi-transform states).
    """
    flat_params = jax.tree_util.tree_flatten_with_path(params_like)[0]
    mult_leaves = jax.tree.leaves(multipliers)
    table = {_path_key(p): (np.shape(x), m) for (p, x), m in zip(flat_params, mult_leaves)}
    lengths = sorted({len(k) for k in table}, reverse=True)

    def fn(path, leaf):
        key = _path_key(path)
        for n in lengths:
            hit = table.get(key[-n:]) if len(key) >= n else None
            if hit is not None and np.shape(leaf) == hit[0]:
                return leaf * hit[1]
        return leaf

    return jax.tree_util.tree_map_with_path(fn, tree)


def kernel_models(*models: nn.Module | None) -> tuple[nn.Module | None, ...]:
    """``models`` whose convolutions call the CPU filter-gradient kernel (``kernels/cpu_conv.py``, registered here
    if it is not yet); a None, or a module without a ``conv_general_dilated`` field, is returned as it is."""
    cpu_conv.register()
    return tuple(m.clone(conv_general_dilated=cpu_conv.conv_general_dilated)
                 if m is not None and hasattr(m, "conv_general_dilated") else m for m in models)


def make_train_step(mesh: Mesh, student: nn.Module, teacher: nn.Module | None, recipe: Recipe,
                    tx: optax.GradientTransformation, cfg: StepConfig, group: GroupStep | None = None) -> Callable:
    """Build the jitted step ``(state, data, teacher_vars, masks, multipliers) -> (state, metrics)``.

    ``teacher`` may be None when neither the method nor joint distillation needs it. ``multipliers`` is the
    pytree of pruning-mask multipliers over ``params`` (see ``models.mask_multipliers``) or None.

    A ``group`` trains several runs of the same shapes at once: the step becomes
    ``(state, data, teacher_vars, masks, multipliers, active) -> (state, metrics)`` where every argument but the
    teacher's variables (when ``group.shared_teacher``) has a leading run axis and ``active[r]`` (bool) says whether
    run ``r`` trains this step (a stopped run keeps its state unchanged, its step counter included). It is
    the one-run step mapped over runs inside the same ``shard_map`` (``group.impl``: ``jax.vmap``, ``lax.map`` or
    unrolled, see :data:`GROUP_IMPLS`): each run has its own parameters, optimizer state, BatchNorm statistics
    (``pmean``-ed over devices per run), data, keys and non-finite counters, so run ``r`` of a group follows the
    same trajectory as run ``r`` trained alone (to float rounding).

    ``cfg.cpu_fusion`` gives the step's XLA:CPU compiler options; ``cfg.cpu_wgrad == "kernel"`` on a CPU mesh
    rebuilds ``student`` and ``teacher`` with the CPU filter-gradient kernel's convolution (:func:`kernel_models`).
    """
    ndev = num_devices(mesh)
    for name, b in (("batch_id", cfg.batch_id), ("batch_ood", cfg.batch_ood)):
        if b % ndev:
            raise ValueError(f"{name}={b} must be divisible by the device count {ndev}")
    if cfg.bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {cfg.bn_mode!r}")
    use_ood = cfg.batch_ood > 0
    use_jd = use_ood and cfg.lambda_jd > 0
    use_reg = use_ood and cfg.eta > 0
    needs_teacher = recipe.needs_teacher or use_jd
    if needs_teacher and teacher is None:
        raise ValueError("this recipe with these OE settings needs a teacher")
    mean, std = jnp.asarray(cfg.mean, jnp.float32), jnp.asarray(cfg.std, jnp.float32)
    opts = xla_cpu.compiler_options(mesh_platform(mesh), cfg.cpu_fusion)
    if cpu_conv.check_mode(cfg.cpu_wgrad) == "kernel" and mesh_platform(mesh) == "cpu":
        student, teacher = kernel_models(student, teacher)

    def prep(keys, images):
        return normalize(augment_batch(keys, images, pad=cfg.pad, flip=cfg.flip), mean, std)

    def draw(state: TrainState, data: StepData):
        """This device's slice of the step's global draws (the same on every device count)."""
        key = jax.random.fold_in(state.rng, state.step)
        k_idx, k_idx_ood, k_aug, k_aug_ood, k_lab = jax.random.split(key, 5)
        dev = lax.axis_index(AXIS)

        def local(a, b_global):
            b = b_global // ndev
            return lax.dynamic_slice_in_dim(a, dev * b, b)

        n = data.x_id.shape[0]
        if cfg.host_batches:  # data holds this step's batch, gathered by the host from the same draws
            idx = local(jnp.arange(cfg.batch_id), cfg.batch_id)
        else:
            idx = local(draw_indices(k_idx, n, cfg.batch_id, data.id_probs), cfg.batch_id)
        out = {"x_id": data.x_id[idx], "y_id": data.y_id[idx],
               "k_id": local(jax.random.split(k_aug, cfg.batch_id), cfg.batch_id)}
        if use_ood:
            m = data.x_ood.shape[0]
            if cfg.host_batches:
                idx_ood = local(jnp.arange(cfg.batch_ood), cfg.batch_ood)
            else:
                idx_ood = local(draw_indices(k_idx_ood, m, cfg.batch_ood), cfg.batch_ood)
            out["x_ood"] = data.x_ood[idx_ood]
            out["k_ood"] = local(jax.random.split(k_aug_ood, cfg.batch_ood), cfg.batch_ood)
            if data.y_ood is not None:  # labels fixed per image (e.g. the class the teacher chose it for)
                out["y_ood"] = data.y_ood[idx_ood]
            else:
                y_ood = jax.random.categorical(k_lab, jnp.log(jnp.maximum(data.gamma, 1e-30)),
                                               shape=(cfg.batch_ood,))
                out["y_ood"] = local(y_ood, cfg.batch_ood)
        return out

    def per_device(state: TrainState, data: StepData, teacher_vars, masks, mult):
        b = draw(state, data)
        xs = [prep(b["k_id"], b["x_id"])]
        if use_ood:
            xs.append(prep(b["k_ood"], b["x_ood"]))
        x_all = jnp.concatenate(xs) if use_ood else xs[0]
        y_id = b["y_id"]
        b_loc = y_id.shape[0]
        t_out = None
        if needs_teacher:
            t_out = teacher.apply(teacher_vars, x_all, train=False)
            t_out = jax.tree.map(lax.stop_gradient, t_out)

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats, "masks": masks}
            if cfg.bn_mode == "joint" or not use_ood:
                out, upd = student.apply(variables, x_all, train=True, mutable=["batch_stats"])
            else:
                out_id, upd = student.apply(variables, xs[0], train=True, mutable=["batch_stats"])
                out_ood, _ = student.apply(variables, xs[1], train=True, mutable=["batch_stats"])
                out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out_id, out_ood)
            s_id = jax.tree.map(lambda a: a[:b_loc], out)
            t_id = None if t_out is None else jax.tree.map(lambda a: a[:b_loc], t_out)
            base = recipe.base_loss(s_id, t_id, y_id)
            parts = {"base": base}
            total = base
            if use_jd:
                jd = losses.joint_distillation(recipe.distill, out, t_out, cfg.tau)
                parts["jd"] = jd
                total = total + cfg.lambda_jd * jd
            if use_reg:
                reg = losses.class_dependent_regularizer(out["logits"][b_loc:], b["y_ood"], data.reg_weights)
                parts["reg"] = reg
                total = total + cfg.eta * reg
            parts["loss"] = total
            parts["train_acc"] = 100.0 * jnp.mean(jnp.argmax(s_id["logits"], -1) == y_id)
            return total, (upd["batch_stats"], parts)

        grads, (batch_stats, parts) = jax.grad(loss_fn, has_aux=True)(state.params)
        grads = lax.pmean(grads, AXIS)
        parts = lax.pmean(parts, AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if mult is not None:
            params = jax.tree.map(jnp.multiply, params, mult)
            opt_state = apply_multipliers(opt_state, params, mult)
        parts["grad_norm"] = optax.tree.norm(grads)
        # A non-finite loss or gradient skips the update on every device (the pmean-ed values agree everywhere):
        # parameters, optimizer moments and BatchNorm statistics stay as they were; the step still advances, so
        # the next step draws a new batch. The train loop stops the run after too many consecutive skips.
        finite = jnp.isfinite(parts["loss"]) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g))
                                                                  for g in jax.tree.leaves(grads)]))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        parts["nonfinite"] = 1.0 - finite.astype(jnp.float32)
        new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                                  batch_stats=keep(batch_stats, state.batch_stats),
                                  opt_state=keep(opt_state, state.opt_state),
                                  nonfinite=jnp.where(finite, 0, state.nonfinite + 1),
                                  skipped=state.skipped + (1 - finite.astype(jnp.int32)))
        return new_state, parts

    # Everything is replicated in and out: each device draws the global batch's indices, keys and labels from the
    # same step key and takes its own slice, so the only communication is the explicit pmean collectives.
    rep = P()
    if group is None:
        step = jax.shard_map(trace_check(per_device), mesh=mesh, in_specs=(rep,) * 5, out_specs=(rep, rep),
                             check_vma=False)
        return jax.jit(step, donate_argnums=(0,), compiler_options=opts)

    def per_run(state, data, teacher_vars, masks, mult, active):
        new_state, parts = per_device(state, data, teacher_vars, masks, mult)
        return jax.tree.map(lambda a, b: jnp.where(active, a, b), new_state, state), parts

    impl = resolve_group_impl(group.impl, mesh_platform(mesh))
    shared_teacher = group.shared_teacher

    def over_runs(state, data, teacher_vars, masks, mult, active):
        if impl == "vmap":
            return jax.vmap(per_run, in_axes=(0, 0, None if shared_teacher else 0, 0, 0, 0))(
                state, data, teacher_vars, masks, mult, active)
        if shared_teacher:
            one = lambda a: per_run(a[0], a[1], teacher_vars, a[2], a[3], a[4])
            xs = (state, data, masks, mult, active)
        else:
            one = lambda a: per_run(*a)
            xs = (state, data, teacher_vars, masks, mult, active)
        if impl == "map":
            return lax.map(one, xs)
        n_runs = active.shape[0]  # unroll: one copy of the step per run in the program
        outs = [one(jax.tree.map(lambda a, r=r: a[r], xs)) for r in range(n_runs)]
        return jax.tree.map(lambda *a: jnp.stack(a), *outs)

    step = jax.shard_map(trace_check(over_runs), mesh=mesh, in_specs=(rep,) * 6, out_specs=(rep, rep), check_vma=False)
    return jax.jit(step, donate_argnums=(0,), compiler_options=opts)


#: how a grouped step runs its runs: ``vmap`` (one batched program: parallel on an accelerator), ``map``
#: (``lax.map``: one run after another inside a loop of the program) or ``unroll`` (one copy of the step per run,
#: which XLA may overlap); ``auto`` = ``vmap`` on GPU/TPU and ``unroll`` on CPU, where XLA's batched-weight
#: convolutions make ``vmap`` slower than one run at a time and ``map`` loses the YNNPACK fusion inside its loop
#: (``benchmarks/grid_throughput.py`` measures each; the figures are in ``benchmarks/README.md``)
GROUP_IMPLS = ("auto", "vmap", "map", "unroll")
#: on a CPU, ``unroll`` compiles one copy per run, so compile time grows with the group: groups there hold at most
#: this many
CPU_UNROLL_MAX = 4


def resolve_group_impl(impl: str, platform: str) -> str:
    """The implementation ``impl`` stands for on ``platform`` (``auto`` resolved); ValueError when unknown."""
    if impl not in GROUP_IMPLS:
        raise ValueError(f"group_impl must be one of {', '.join(GROUP_IMPLS)}, got {impl!r}")
    if impl == "auto":
        return "unroll" if platform == "cpu" else "vmap"
    return impl


def make_predict(mesh: Mesh, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 batch_size: int = 256, cpu_fusion: str = xla_cpu.DEFAULT
                 ) -> Callable[[dict, np.ndarray], dict[str, np.ndarray]]:
    """A function ``(variables, x_uint8) -> {'logits': [N, K]}`` that evaluates in batches split over the mesh,
    compiled under the XLA:CPU fusion mode ``cpu_fusion`` (``training/xla_cpu.py``).

    The last batch is padded to the global batch size and trimmed; the compiled forward is reused across calls.
    """
    ndev = num_devices(mesh)
    batch_size = max(ndev, batch_size - batch_size % ndev)
    mean_a, std_a = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    rep = replicated(mesh)

    def forward(variables, x):
        return model.apply(variables, normalize(x, mean_a, std_a), train=False)["logits"]

    # logits come back replicated (an all-gather inside the program), so every process can read them all
    forward = jax.jit(trace_check(forward), out_shardings=rep,
                      compiler_options=xla_cpu.compiler_options(mesh_platform(mesh), cpu_fusion))

    def place(v):
        if isinstance(v, jax.Array) and v.sharding.is_equivalent_to(rep, v.ndim):
            return v
        v = np.asarray(jax.device_get(v))
        return jax.make_array_from_callback(v.shape, rep, lambda idx: v[idx])

    def predict(variables: dict, x: np.ndarray) -> dict[str, np.ndarray]:
        variables = jax.tree.map(place, variables)
        out = []
        for start in range(0, len(x), batch_size):
            chunk = np.asarray(x[start:start + batch_size])
            pad = batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            logits = forward(variables, shard_batch(chunk, mesh))
            out.append(np.asarray(jax.device_get(logits))[:batch_size - pad])
        logits = np.concatenate(out) if out else np.zeros((0,), np.float32)
        return {"logits": logits}

    return predict
