"""The demo config shrunk to a tiny model and 8x8 images, in-process or as command-line overrides (shared by the
end-to-end tests)."""

from helpers import REPO, config  # noqa: F401 (tiny_demo.REPO is used by the end-to-end tests)

demo = config("demo")

OVERRIDES = {
    "data.image_size": 8, "data.id.image_size": 8, "data.test.image_size": 8, "data.ood.image_size": 8,
    "data.ood.num_images": 600, "data.pad": 1, "arch.widths": (4, 8, 8), "teacher.steps": 40,
    "teacher.batch_size": 64, "train.steps": 400, "train.batch_id": 16, "train.batch_ood": 16,
    "train.log_every": 100, "train.ckpt_every": 50, "oe.heldout": 100, "oe.eval_every": 50, "oe.patience": 100,
    "eval.latency": False,
}


def config(overrides=None):
    """``configs/demo.py:per_class=5`` with ``overrides`` (default :data:`OVERRIDES`) applied."""
    c = demo.get_config("per_class=5")
    for key, value in (overrides or OVERRIDES).items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def flags(overrides=None):
    """The same overrides as ``--config.FIELD=VALUE`` flags."""
    return [f"--config.{k}=({','.join(map(str, v))},)" if isinstance(v, tuple) else f"--config.{k}={v}"
            for k, v in (overrides or OVERRIDES).items()]
