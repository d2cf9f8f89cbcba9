"""chex: no retrace across runs of one shape; the pure losses, samplers and complementary-label functions give the
same values with and without ``jit``; their boundaries refuse wrong ranks and dtypes."""

import collections
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_spec

from oefsmc_jax import losses
from oefsmc_jax.methods import KD
from oefsmc_jax.methods.fit import batch_indices
from oefsmc_jax.models import build_model, l1_prune
from oefsmc_jax.oe import complementary
from oefsmc_jax.training import step as step_mod
from oefsmc_jax.training import train as train_mod
from oefsmc_jax.training.loop import finetune
from oefsmc_jax.training.parallel import make_mesh, replicate
from oefsmc_jax.training.step import StepConfig, StepData, draw_indices

SIZE, K = 8, 10
MEAN, STD = (0.5,) * 3, (0.25,) * 3
CFG = StepConfig(batch_id=8, batch_ood=8, pad=1, flip=True, mean=MEAN, std=STD, lambda_jd=1.0, eta=0.1, tau=4.0)
OPTIM = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine"}


# ---------------------------------------------------------------------- no retrace
@pytest.fixture
def traces(monkeypatch):
    """Every train step and eval forward built during the test is wrapped in ``chex.assert_max_traces(n=1)`` (and
    counted); the trainer caches are emptied before and after, so no step built here outlives the test."""
    from oefsmc_jax.training import from_config

    count = collections.Counter()

    def check(fn):
        once = chex.assert_max_traces(fn, n=1)

        def counted(*args, **kwargs):
            count[fn.__name__] += 1
            return once(*args, **kwargs)

        return counted

    def clear():
        chex.clear_trace_counter()
        train_mod.clear_trainer_cache()
        from_config.predict_fn.cache_clear()

    clear()
    monkeypatch.setattr(step_mod, "trace_check", check)
    yield count
    clear()


def _arm_data(rng, counts, mesh):
    y = np.repeat(np.arange(K), counts).astype(np.int32)
    x = rng.integers(0, 256, (len(y), SIZE, SIZE, 3), dtype=np.uint8)
    x_ood = rng.integers(0, 256, (24, SIZE, SIZE, 3), dtype=np.uint8)
    gamma = np.asarray(complementary.complementary_distribution(jnp.asarray(counts)), np.float32)
    weights = np.asarray(complementary.class_weights(jnp.asarray(gamma)), np.float32)
    return StepData(x_id=replicate(x, mesh), y_id=replicate(y, mesh), x_ood=replicate(x_ood, mesh), id_probs=None,
                    gamma=replicate(gamma, mesh), reg_weights=replicate(weights, mesh))


@pytest.mark.slow
def test_seeds_and_arms_of_one_shape_trace_the_step_and_eval_forward_once(traces, tmp_path):
    """Three seeds x two arms (few-sample sets with different class counts, their own OOD images and complementary
    distributions; the same shapes) through the training loop with early-stopping evaluations, then the
    run's eval forward on a test split: one trace of each."""
    from oefsmc_jax.training.from_config import predict_fn

    t_spec = tiny_spec(8, K)
    t_vars = jax.device_get(build_model(t_spec).init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)),
                                                     train=False))
    s_spec, s_vars = l1_prune(t_spec, t_vars, 0.5)
    mesh = make_mesh(2)
    rng = np.random.default_rng(0)
    arms = {"a": _arm_data(rng, [4, 4, 3, 3, 2, 2, 2, 1, 1, 1], mesh),
            "b": _arm_data(rng, [1, 1, 1, 2, 2, 2, 3, 3, 4, 4], mesh)}
    held = rng.integers(0, 256, (20, SIZE, SIZE, 3), dtype=np.uint8)
    test_x = rng.integers(0, 256, (37, SIZE, SIZE, 3), dtype=np.uint8)
    loop = train_mod.LoopConfig(steps=2, log_every=1, eval_every=1, patience=10, ckpt_every=100)
    for arm, data in arms.items():
        for seed in (0, 1, 2):
            res = finetune(train_mod.RunJob(name=f"{arm}{seed}", workdir=tmp_path / f"{arm}{seed}", mesh=mesh,
                                            spec=s_spec, variables=s_vars, recipe=KD(MEAN).recipe(),
                                            teacher_spec=t_spec, teacher_variables=t_vars, data=data, step_cfg=CFG,
                                            optim_cfg=OPTIM, loop=loop, seed=seed,
                                            heldout=(held, np.zeros(len(held), np.int64))), log=lambda s: None)
            assert res.steps_run == 2
            logits = predict_fn(mesh, s_spec, MEAN, STD, 16)(res.variables, test_x)["logits"]
            assert logits.shape == (len(test_x), K)
    # one step trace; one forward trace in the trainer (early stopping) and one in the pipeline's predict_fn
    assert traces == {"per_device": 1, "forward": 2}


# ---------------------------------------------------------------------- pure functions, with and without jit
LOGITS = jnp.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0], [-2.0, 0.0, 2.0]])
TEACHER = jnp.array([[1.0, 0.0, 0.0], [0.5, 0.5, 2.0], [0.0, 3.0, 1.0], [1.0, -1.0, 0.0]])
LABELS = jnp.array([0, 2, 1, 1])
WEIGHTS = jnp.array([0.5, 1.5, 1.0, 1.0])


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


class PureFunctionsTest(chex.TestCase):
    """Each pure function as it is called inside the step (jitted) and outside (eager): the same values."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_cross_entropy_and_kd(self):
        ce_ref = -_np_log_softmax(LOGITS)[np.arange(4), np.asarray(LABELS)]
        ce = self.variant(losses.cross_entropy)(LOGITS, LABELS, WEIGHTS)
        np.testing.assert_allclose(ce, np.sum(ce_ref * np.asarray(WEIGHTS)) / 4, rtol=1e-6)
        tau = 2.0
        t, s = _np_log_softmax(np.asarray(TEACHER) / tau), _np_log_softmax(np.asarray(LOGITS) / tau)
        kl_ref = tau**2 * np.mean(np.sum(np.exp(t) * (t - s), -1))
        np.testing.assert_allclose(self.variant(losses.kd_kl)(LOGITS, TEACHER, tau), kl_ref, rtol=1e-5)
        kd = self.variant(losses.kd_loss)(LOGITS, TEACHER, LABELS, 0.9, tau)
        np.testing.assert_allclose(kd, 0.1 * ce_ref.mean() + 0.9 * kl_ref, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_features_regulariser_and_logit_adjustment(self):
        f_s = jnp.arange(2 * 2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 2, 3) / 10
        f_t = jnp.ones_like(f_s)
        d = (np.asarray(f_s) - 1.0) ** 2
        np.testing.assert_allclose(self.variant(losses.feature_mse)(f_s, f_t), d.mean(), rtol=1e-6)
        jd = self.variant(functools.partial(losses.joint_distillation, "features"))(
            {"features": f_s}, {"features": f_t})
        np.testing.assert_allclose(jd, d.mean(), rtol=1e-6)
        w = jnp.array([0.5, 1.0, 1.5])
        ce_ref = -_np_log_softmax(LOGITS)[np.arange(4), np.asarray(LABELS)]
        reg = self.variant(losses.class_dependent_regularizer)(LOGITS, LABELS, w)
        np.testing.assert_allclose(reg, np.mean(ce_ref * np.asarray(w)[np.asarray(LABELS)]), rtol=1e-6)
        prior = jnp.array([0.7, 0.2, 0.1])
        la = self.variant(losses.logit_adjusted_cross_entropy)(LOGITS, LABELS, prior)
        ref = -_np_log_softmax(np.asarray(LOGITS) + np.log(np.asarray(prior)))[np.arange(4), np.asarray(LABELS)]
        np.testing.assert_allclose(la, ref.mean(), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_complementary_labels(self):
        counts = jnp.array([6, 3, 1])
        gamma = self.variant(complementary.complementary_distribution)(counts)
        beta = np.array([0.6, 0.3, 0.1])
        np.testing.assert_allclose(gamma, (0.7 - beta) / np.sum(0.7 - beta), rtol=1e-6)
        np.testing.assert_allclose(self.variant(complementary.complementary_distribution)(counts, 0.6),
                                   (0.6 - beta) / np.sum(0.6 - beta), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(self.variant(complementary.class_weights)(gamma), 3 * np.asarray(gamma),
                                   rtol=1e-6)
        np.testing.assert_allclose(self.variant(functools.partial(complementary.expected_class_counts, m=10))(
            counts), np.array([6, 3, 1]) + 10 * np.asarray(gamma), rtol=1e-6)
        w = self.variant(functools.partial(complementary.balancing_weights, num_classes=3))(jnp.array([0, 0, 2]))
        np.testing.assert_allclose(w, [0.75, 0.75, 1.5], rtol=1e-6)
        draw = self.variant(functools.partial(complementary.sample_ood_labels, num=4000))
        y = draw(jax.random.PRNGKey(0), gamma)
        assert y.shape == (4000,) and jnp.issubdtype(y.dtype, jnp.integer)
        np.testing.assert_allclose(np.bincount(np.asarray(y), minlength=3) / 4000, gamma, atol=0.03)

    @chex.variants(with_jit=True, without_jit=True)
    def test_samplers(self):
        key = jax.random.PRNGKey(3)
        idx = self.variant(functools.partial(draw_indices, n=10, b=6))(key)
        assert sorted(set(np.asarray(idx).tolist())) == sorted(np.asarray(idx).tolist())  # without replacement
        assert idx.shape == (6,) and int(idx.min()) >= 0 and int(idx.max()) < 10
        probs = jnp.zeros(10).at[7].set(1.0)
        np.testing.assert_array_equal(self.variant(functools.partial(draw_indices, n=10, b=5))(key, probs=probs),
                                      np.full(5, 7))
        b = self.variant(functools.partial(batch_indices, n=4, batch_size=10))(key)
        counts = np.bincount(np.asarray(b), minlength=4)
        assert b.shape == (10,) and counts.min() >= 2 and counts.max() <= 3  # as balanced as drawing can be


# ---------------------------------------------------------------------- boundary asserts
@pytest.mark.parametrize("call", [
    lambda: losses.cross_entropy(LOGITS[0], LABELS),  # logits [K], not [B, K]
    lambda: losses.cross_entropy(LOGITS, LABELS.astype(jnp.float32)),  # float labels
    lambda: losses.cross_entropy(LOGITS, LABELS[:3]),  # B mismatch
    lambda: losses.cross_entropy(LOGITS, LABELS, WEIGHTS[:3]),
    lambda: losses.kd_kl(LOGITS, TEACHER[:, :2]),
    lambda: losses.feature_mse(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 6))),  # would broadcast silently
    lambda: losses.class_dependent_regularizer(LOGITS, LABELS, jnp.ones(4)),
    lambda: losses.logit_adjusted_cross_entropy(LOGITS, LABELS, jnp.ones((1, 3))),
    lambda: complementary.complementary_distribution(jnp.ones((2, 3))),
    lambda: complementary.sample_ood_labels(jax.random.PRNGKey(0), jnp.ones((1, 3)), 4),
    lambda: complementary.balancing_weights(jnp.array([0.0, 1.0]), 2),
    lambda: draw_indices(jax.random.PRNGKey(0), 10, 4, jnp.ones(9) / 9),
])
def test_boundaries_refuse_wrong_ranks_and_dtypes(call):
    with pytest.raises(AssertionError, match=r"\[Chex\]"):
        call()
    with pytest.raises(AssertionError, match=r"\[Chex\]"):  # at trace time, under jit too
        jax.jit(call)()


def test_boundary_asserts_cost_nothing_in_the_compiled_function():
    """The checks run while tracing only: the jitted loss's program has no trace of them."""
    text = jax.jit(losses.cross_entropy).lower(LOGITS, LABELS).as_text()
    assert "assert" not in text.lower() and math.isfinite(float(jax.jit(losses.cross_entropy)(LOGITS, LABELS)))
