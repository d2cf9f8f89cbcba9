"""Each method owns its OE-FSMC settings (resolve_oe), the calibration set's OOD share, CD's rows and official
fine-tuning, FSKD's Q kept as a layer until export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_spec

from oefsmc_jax.config_defaults import base_config
from oefsmc_jax.data import ImageSet
from oefsmc_jax.data.prepare import RunData
from oefsmc_jax.errors import ConfigError
from oefsmc_jax.methods import (
    CD,
    FSKD,
    KD,
    METHODS,
    PRACTISE,
    CompressionContext,
    Method,
    MiR,
    OESettings,
    build_method,
    resolve_oe,
)
from oefsmc_jax.methods.cd import CDParams, layer_rows
from oefsmc_jax.methods.fskd_solver import fold_corrections
from oefsmc_jax.models import build_model, init_variables, shrink
from oefsmc_jax.oe import complementary
from oefsmc_jax.oe.arms import ARMS, ArmOOD
from oefsmc_jax.oe.calibration import Calibration, arm_calibration
from oefsmc_jax.training.parallel import make_mesh, replicate
from oefsmc_jax.training.step import StepData, init_state
from oefsmc_jax.training.train import make_trainer

K, SIZE = 10, 8
SPEC = tiny_spec(8, K)
MEAN, STD = (0.5,) * 3, (0.25,) * 3


@pytest.fixture(scope="module")
def teacher():
    return init_variables(SPEC, SIZE, 0)


@pytest.fixture(scope="module")
def tiny_data():
    rng = np.random.default_rng(0)
    counts = np.array([6, 5, 4, 3, 3, 2, 2, 1, 1, 1])
    y = np.repeat(np.arange(K), counts).astype(np.int32)
    train = ImageSet(rng.integers(0, 256, (len(y), SIZE, SIZE, 3), dtype=np.uint8), y, "train")
    ood = ImageSet(rng.integers(0, 256, (40, SIZE, SIZE, 3), dtype=np.uint8), np.full(40, -1, np.int32), "ood")
    held = ImageSet(rng.integers(0, 256, (32, SIZE, SIZE, 3), dtype=np.uint8), np.full(32, -1, np.int32), "held")
    return RunData(train, counts, ood, held, train, None)


def _config(**oe):
    c = base_config()
    c.data.num_classes = K
    c.data.image_size = SIZE
    c.data.mean, c.data.std = MEAN, STD
    c.train.batch_id = c.train.batch_ood = 8
    c.eval.batch_size = 64
    for k, v in oe.items():
        c.oe[k] = v
    return c


def test_config_reference_holds_the_sentinels():
    c = base_config()
    assert (c.oe.lambda_jd, c.oe.eta, c.oe.bn_mode, c.oe.calibration_ood_share) == (-1.0, -1.0, "method", "method")
    assert (c.method.cd.finetune, c.method.cd.batch_size, c.method.cd.finetune_steps) == ("official", 0, -1)
    assert (c.method.fskd.fold, c.method.fskd.target) == ("export", "branch")


def test_resolve_oe_gives_each_method_its_defaults_and_the_config_overrides_them():
    c = base_config()
    for name, cls in METHODS.items():
        s = resolve_oe(c, cls)
        assert s == cls.oe_defaults, name
        assert (s.eta == 0.0) == (cls in (MiR, PRACTISE, KD)), name  # R off: label-free recipes; KD by its sweep
    # the values the validation sweep chose (tests/test_tuning.py ties every one to the sweep's records)
    assert resolve_oe(c, CD) == OESettings(lambda_jd=3.0, eta=0.1, bn_mode="joint", calibration_ood_share=0.5)
    assert resolve_oe(c, FSKD).calibration_ood_share == 0.0
    assert resolve_oe(c, PRACTISE).lambda_jd == 1.0
    assert resolve_oe(c, MiR) == OESettings(lambda_jd=3.0, eta=0.0, bn_mode="separate")
    assert resolve_oe(c, METHODS["bp"]).eta == 0.01
    c.oe.eta, c.oe.lambda_jd, c.oe.bn_mode, c.oe.calibration_ood_share = 0.1, 1.0, "separate", "0.25"
    s = resolve_oe(c, MiR)
    assert (s.eta, s.lambda_jd, s.bn_mode, s.calibration_ood_share) == (0.1, 1.0, "separate", 0.25)
    c.oe.calibration_ood_share = "count"
    assert resolve_oe(c, CD).calibration_ood_share is None


@pytest.mark.parametrize("field,value,match", [
    ("eta", -0.5, "config.oe.eta: must be >= 0"),
    ("lambda_jd", -2.0, "config.oe.lambda_jd: must be >= 0"),
    ("bn_mode", "mixed", "config.oe.bn_mode: must be one of joint, separate or 'method'"),
    ("calibration_ood_share", "half", "config.oe.calibration_ood_share: 'half' is not allowed"),
    ("calibration_ood_share", "1", r"config.oe.calibration_ood_share: must be a fraction in \[0, 1\)"),
])
def test_bad_oe_settings_fail_in_one_line(field, value, match):
    c = base_config()
    c.oe[field] = value
    with pytest.raises(ConfigError, match=match):
        resolve_oe(c, MiR)


def _step_metrics(teacher, tiny_data, config, method):
    """One train step of ``method``'s recipe with the step settings the pipeline derives from ``config`` for the
    'oe' arm (resolve_oe, then the arm's eta)."""
    settings = resolve_oe(config, method)
    eta = ARMS["oe"].eta(config, settings.eta)
    from oefsmc_jax.training.step import StepConfig

    cfg = StepConfig(batch_id=8, batch_ood=8, pad=1, mean=MEAN, std=STD, lambda_jd=settings.lambda_jd, eta=eta,
                     bn_mode=settings.bn_mode)
    mesh = make_mesh(1)
    trainer = make_trainer(mesh, SPEC, SPEC, method.recipe(), cfg, {"name": "sgd", "lr": 0.01,
                                                                    "schedule": "constant"}, 1)
    d = tiny_data
    data = replicate(StepData(d.train.x, d.train.y, d.ood.x, None, np.full(K, 0.1, np.float32),
                              np.ones(K, np.float32)), mesh)
    state = replicate(init_state(teacher, trainer.tx, 0), mesh)
    _, metrics = trainer.step(state, data, replicate(teacher, mesh), replicate(teacher["masks"], mesh), None)
    return eta, metrics


@pytest.mark.slow
def test_r_is_off_for_mir_by_default_and_on_when_eta_is_set(teacher, tiny_data):
    mir = MiR((0.5,) * 3)
    eta, metrics = _step_metrics(teacher, tiny_data, _config(), mir)
    assert eta == 0.0 and "reg" not in metrics and "jd" in metrics
    eta, metrics = _step_metrics(teacher, tiny_data, _config(eta=0.1), mir)
    assert eta == 0.1 and float(metrics["reg"]) > 0
    lam = MiR.oe_defaults.lambda_jd  # the method's own joint-distillation weight
    assert float(metrics["loss"]) == pytest.approx(float(metrics["base"]) + lam * float(metrics["jd"])
                                                   + 0.1 * float(metrics["reg"]), rel=1e-5)


def test_r_on_arm_with_r_off_method_is_refused():

    from helpers import config

    from oefsmc_jax.config_validation import validate

    demo = config("demo")

    c = demo.get_config()
    c.method.name = "mir"
    c.arms = "base,oe_complement_r"
    with pytest.raises(ConfigError, match="config.oe.eta: arm 'oe_complement_r' switches R on, but method 'mir'"):
        validate(c, num_devices=1)


def calibration_set(config, data, oe_on, gamma):
    """The calibration set the run builds for an arm of the base method under ``config`` (its share setting)."""
    return arm_calibration(config, data, oe_on, gamma, ood_share=resolve_oe(config, Method).calibration_ood_share)


@pytest.mark.parametrize("share", [0.25, 0.5, 0.1])
def test_ood_share_bounds_the_weight_of_the_ood_rows(tiny_data, share):
    gamma = np.asarray(complementary.complementary_distribution(jnp.asarray(tiny_data.counts)))
    cal = calibration_set(_config(calibration_ood_share=str(share)), tiny_data, True, gamma)
    assert cal.is_ood.sum() == 40
    assert cal.weights[cal.is_ood].sum() / cal.weights.sum() == pytest.approx(share, rel=1e-6)
    assert cal.weights.mean() == pytest.approx(1.0, rel=1e-6)
    id_totals = np.bincount(cal.y[~cal.is_ood], weights=cal.weights[~cal.is_ood], minlength=K)
    np.testing.assert_allclose(id_totals, id_totals[0], rtol=1e-5)  # the ID part stays class-balanced


def test_ood_share_zero_drops_the_ood_rows_and_count_is_the_old_weighting(tiny_data):
    gamma = np.asarray(complementary.complementary_distribution(jnp.asarray(tiny_data.counts)))
    zero = calibration_set(_config(calibration_ood_share="0"), tiny_data, True, gamma)
    assert not zero.is_ood.any() and len(zero) == len(tiny_data.train)
    count = calibration_set(_config(calibration_ood_share="count"), tiny_data, True, gamma)
    expected = np.asarray(complementary.balancing_weights(jnp.asarray(count.y), K))
    np.testing.assert_array_equal(count.weights, expected)


def test_cd_layer_solve_uses_every_id_row_and_keeps_the_ood_share():
    n_id, n_ood = 60, 300
    y = np.concatenate([np.arange(n_id) % K, np.arange(n_ood) % K]).astype(np.int32)
    is_ood = np.arange(n_id + n_ood) >= n_id
    w = np.where(is_ood, 0.5, 2.0).astype(np.float32)
    cal = Calibration(np.zeros((len(y), 1, 1, 3), np.uint8), y, w, is_ood)
    idx, wsub = layer_rows(cal, CDParams(max_images=100), jax.random.PRNGKey(0))
    assert set(np.nonzero(~is_ood)[0]) <= set(idx) and len(idx) == 100
    share = w[is_ood].sum() / w.sum()
    assert wsub[is_ood[idx]].sum() / wsub.sum() == pytest.approx(share, rel=1e-5)
    idx_all, _ = layer_rows(cal, CDParams(), jax.random.PRNGKey(0))
    assert len(idx_all) == n_id + n_ood  # under max_images: every row
    idx_old, _ = layer_rows(cal, CDParams(batch_size=128), jax.random.PRNGKey(0))
    assert len(idx_old) == 128 and (~is_ood[idx_old]).sum() < n_id  # the old fixed subset misses ID rows


def test_cd_official_finetuning_reaches_the_loop(teacher, tiny_data, monkeypatch, tmp_path):
    from oefsmc_jax import run as run_mod

    seen = {}
    monkeypatch.setattr(run_mod, "finetune", lambda job: seen.update(vars(job)))
    c = _config(lambda_jd=1.0, bn_mode="separate")
    c.method.name = "cd"
    cd = build_method(c.method, SPEC)
    assert isinstance(cd, CD) and cd.finetune_steps == 100
    mesh = make_mesh(1)
    gamma = np.full(K, 0.1)

    def finetune_base(method, heldout_pred):
        ctx = run_mod.RunContext(c, tmp_path, mesh, tiny_data, method, (SPEC, teacher), tiny_data.test.y,
                                 heldout_pred, None, {"cpu_fusion": "exact", "cpu_wgrad": "xla"})
        plan = run_mod.ArmPlan("base", ARMS["base"], resolve_oe(c, cd), ArmOOD(tiny_data.ood), gamma, 0.0,
                               method.recipe())
        run_mod.finetune_arm(ctx, plan, SPEC, teacher)

    c.oe.early_stopping_arms = "all"  # the base arm could stop early: the official schedule still does not
    finetune_base(cd, tiny_data.heldout.y)
    cfg, loop, opt = seen["step_cfg"], seen["loop"], seen["optim_cfg"]
    assert (loop.steps, loop.eval_every) == (100, 0)
    assert (cfg.batch_id, cfg.batch_ood, cfg.pad, cfg.flip) == (len(tiny_data.train), 0, 0, False)
    assert (cfg.lambda_jd, cfg.bn_mode) == (1.0, "separate")
    assert (opt["lr"], opt["weight_decay"], opt["momentum"], opt["schedule"], tuple(opt["decay_at"])) == (
        1e-5, 5e-4, 0.9, "step", (0.5, 0.75))
    c.method.cd.finetune = "ce"  # the project's loop, as the committed grids ran it
    finetune_base(build_method(c.method, SPEC), None)
    assert (seen["loop"].steps, seen["step_cfg"].batch_id, seen["optim_cfg"]["lr"]) == (c.train.steps, 8,
                                                                                       c.optim.lr)
    c.oe.early_stopping, c.oe.track_best = False, True  # scores the held-out slice, never stops
    finetune_base(build_method(c.method, SPEC), tiny_data.heldout.y)
    assert (seen["loop"].eval_every, seen["loop"].stop_early) == (c.oe.eval_every, False)
    assert seen["heldout"][1] is tiny_data.heldout.y


def _fskd_ctx(teacher, tiny_data):
    gamma = np.asarray(complementary.complementary_distribution(jnp.asarray(tiny_data.counts)))
    cal = calibration_set(_config(), tiny_data, True, gamma)
    return CompressionContext(SPEC, teacher, cal, MEAN, STD, jax.random.PRNGKey(0))


def _logits(spec, variables, x, train=False):
    out = build_model(spec).apply(variables, x, train=train, mutable=["batch_stats"] if train else False)
    return (out[0] if train else out)["logits"]


@pytest.mark.parametrize("target", ["branch", "block"])
@pytest.mark.slow
def test_fskd_keeps_q_as_a_layer_and_folds_it_at_export(teacher, tiny_data, target):
    ctx = _fskd_ctx(teacher, tiny_data)
    fskd = build_method({"name": "fskd", "prune_ratio": 0.5, "fskd": {"target": target, "finetune": True}}, SPEC)
    assert isinstance(fskd, FSKD) and fskd.params.fold == "export"
    spec, variables = fskd.compress(ctx)
    assert spec.corrections == ("bn1", "bn2")
    q = np.asarray(variables["params"]["s1b0"]["q_bn1"])
    assert q.shape == (4, 4) and not np.allclose(q, np.eye(4))
    spec, variables = shrink(spec, variables)  # the pipeline's shrink before fine-tuning keeps Q as a layer
    assert spec.corrections and "q_bn2" in variables["params"]["s2b0"]
    x = ctx.images()
    # trainable in train mode: Q gets a gradient
    g = jax.grad(lambda p: jnp.sum(_logits(spec, {**variables, "params": p}, x, train=True)))(variables["params"])
    assert float(jnp.abs(g["s1b0"]["q_bn1"]).sum()) > 0
    folded_spec, folded = fold_corrections(spec, variables)
    assert not folded_spec.corrections and "q_bn1" not in folded["params"]["s1b0"]
    assert "corrections" not in folded_spec.to_dict()
    np.testing.assert_allclose(_logits(folded_spec, folded, x), _logits(spec, variables, x), rtol=1e-4, atol=1e-4)


def test_fskd_fold_at_solve_matches_fold_at_export_in_eval_mode(teacher, tiny_data):
    ctx = _fskd_ctx(teacher, tiny_data)
    s_exp, v_exp = fold_corrections(*build_method({"name": "fskd", "prune_ratio": 0.5}, SPEC).compress(ctx))
    s_sol, v_sol = build_method({"name": "fskd", "prune_ratio": 0.5, "fskd": {"fold": "solve"}}, SPEC).compress(ctx)
    assert s_exp == s_sol
    x = ctx.images()
    np.testing.assert_allclose(_logits(s_exp, v_exp, x), _logits(s_sol, v_sol, x), rtol=1e-3, atol=1e-3)


def test_fskd_target_block_needs_the_block_output_q():
    with pytest.raises(ConfigError, match="config.method.fskd.target: 'block' fits the block-output Q"):
        build_method({"name": "fskd", "prune_ratio": 0.5, "fskd": {"target": "block", "block_output": False}}, SPEC)
    with pytest.raises(ConfigError, match="config.method.fskd.fold: must be 'export' or 'solve'"):
        build_method({"name": "fskd", "prune_ratio": 0.5, "fskd": {"fold": "never"}}, SPEC)
