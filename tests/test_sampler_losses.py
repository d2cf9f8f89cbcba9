"""Complementary sampler and losses against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oefsmc_jax import losses
from oefsmc_jax.oe import complementary


def test_complementary_distribution_default_alpha():
    # beta = [.5, .25, .25]; alpha = .75; gaps [.25, .5, .5] / 1.25
    gamma = complementary.complementary_distribution(jnp.array([4, 2, 2]))
    np.testing.assert_allclose(gamma, [0.2, 0.4, 0.4], rtol=1e-6)
    np.testing.assert_allclose(complementary.class_weights(gamma), [0.6, 1.2, 1.2], rtol=1e-6)


def test_complementary_distribution_alpha_max_rebalances_in_expectation():
    counts = jnp.array([4, 2, 2])
    gamma = complementary.complementary_distribution(counts, alpha=0.5)
    np.testing.assert_allclose(gamma, [0.0, 0.5, 0.5], atol=1e-7)
    m = 3 * 4 - 8  # K * n_max - n
    np.testing.assert_allclose(complementary.expected_class_counts(counts, m, alpha=0.5), [4, 4, 4], rtol=1e-6)


@pytest.mark.parametrize("alpha", [None, 1.0 / 3.0, 0.9])
def test_balanced_set_gives_uniform_never_nan(alpha):
    gamma = jax.jit(complementary.complementary_distribution)(jnp.array([5, 5, 5]), alpha)
    assert not np.any(np.isnan(gamma))
    np.testing.assert_allclose(gamma, [1 / 3] * 3, rtol=1e-6)


def test_sampled_labels_follow_gamma_and_change_with_key():
    gamma = jnp.array([0.0, 0.1, 0.3, 0.6])
    draw = jax.jit(complementary.sample_ood_labels, static_argnums=2)
    y = np.asarray(draw(jax.random.key(0), gamma, 200_000))
    freq = np.bincount(y, minlength=4) / y.size
    np.testing.assert_allclose(freq, gamma, atol=0.005)
    assert freq[0] == 0.0
    y2 = np.asarray(draw(jax.random.key(1), gamma, 200_000))
    assert np.mean(y != y2) > 0.3


def test_balancing_weights_equalise_classes():
    labels = jnp.array([0, 0, 0, 1])
    w = complementary.balancing_weights(labels, 2)
    # raw 1/3,1/3,1/3,1 -> sum 2 -> normalised to mean 1: x 4/2
    np.testing.assert_allclose(w, [2 / 3, 2 / 3, 2 / 3, 2.0], rtol=1e-6)
    # a class with no sample (class 1) is skipped: raw 1/2, 1/2, 1 -> sum 2 -> x 3/2; classes 0 and 2 weigh 1.5 each
    np.testing.assert_allclose(complementary.balancing_weights(jnp.array([0, 0, 2]), 3), [0.75, 0.75, 1.5], rtol=1e-6)


def test_cross_entropy_and_weights():
    logits = jnp.zeros((2, 3))
    assert float(losses.cross_entropy(logits, jnp.array([0, 2]))) == pytest.approx(math.log(3), rel=1e-6)
    w = jnp.array([0.5, 1.5])
    assert float(losses.cross_entropy(logits, jnp.array([0, 2]), w)) == pytest.approx(math.log(3), rel=1e-6)
    logits = jnp.array([[2.0, 0.0], [0.0, 0.0]])
    per = [math.log(1 + math.exp(-2.0)), math.log(2)]
    assert float(losses.cross_entropy(logits, jnp.array([0, 1]), w)) == pytest.approx(
        (0.5 * per[0] + 1.5 * per[1]) / 2, rel=1e-6)


def test_kd_kl_hand_value_and_tau_scaling():
    teacher = jnp.array([[0.0, 0.0]])
    student = jnp.array([[math.log(3.0), 0.0]])
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(losses.kd_kl(student, teacher, tau=1.0)) == pytest.approx(kl, rel=1e-5)
    assert float(losses.kd_kl(2 * student, teacher, tau=2.0)) == pytest.approx(4 * kl, rel=1e-5)
    assert float(losses.kd_kl(teacher, teacher, tau=4.0)) == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_mixes_ce_and_kl():
    teacher = jnp.array([[0.0, 0.0]])
    student = jnp.array([[math.log(3.0), 0.0]])
    y = jnp.array([1])
    ce = math.log(4.0)  # p = [.75, .25]
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    got = float(losses.kd_loss(student, teacher, y, gamma=0.9, tau=1.0))
    assert got == pytest.approx(0.1 * ce + 0.9 * kl, rel=1e-5)


def test_regulariser_uses_class_weights_of_sampled_labels():
    logits = jnp.zeros((2, 3))
    w = jnp.array([0.6, 1.2, 1.2])
    got = float(losses.class_dependent_regularizer(logits, jnp.array([0, 1]), w))
    assert got == pytest.approx(0.9 * math.log(3), rel=1e-6)


def test_joint_distillation_kinds():
    s = {"logits": jnp.array([[math.log(3.0), 0.0]]), "features": jnp.ones((1, 2, 2, 1))}
    t = {"logits": jnp.zeros((1, 2)), "features": jnp.zeros((1, 2, 2, 1))}
    assert float(losses.joint_distillation("features", s, t)) == pytest.approx(1.0)
    # teacher p = [.5, .5], student q = [.75, .25]: KL(p || q) by hand (tau = 1, so no tau^2 factor)
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(losses.joint_distillation("logits", s, t, tau=1.0)) == pytest.approx(kl, rel=1e-5)
    # tau = 2 reaches kd_kl: student q = softmax([log(3) / 2, 0]) = [sqrt 3, 1] / (sqrt 3 + 1), times tau^2 = 4
    q = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]
    kl2 = 4 * (0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1]))
    assert float(losses.joint_distillation("logits", s, t, tau=2.0)) == pytest.approx(kl2, rel=1e-5)
    with pytest.raises(ValueError, match="joint distillation kind"):
        losses.joint_distillation("bogus", s, t)


def test_logit_adjusted_ce_shifts_by_log_prior():
    prior = jnp.array([0.8, 0.2])
    logits = jnp.zeros((1, 2))
    got = float(losses.logit_adjusted_cross_entropy(logits, jnp.array([1]), prior))
    assert got == pytest.approx(-math.log(0.2 / (0.8 + 0.2)), rel=1e-6)
