"""ILSVRC-2012 through ``tfds.data_source`` (``imagenet2012``; place the archives in the TFDS manual dir and run
``tfds build imagenet2012``), ResNet-34 teacher (torchvision layout), 224x224.

The few-sample set is read lazily: only labels are scanned (cached in the workdir) and only the chosen images are
decoded. ``ood`` names the tfds dataset/split of the OOD pool (default ``places365_small/validation``, the first
20,000 images); point it at your own pool (it must not contain ImageNet images).
``teacher=PATH`` (an Orbax model written by this tool) is required for real runs: import torchvision's official
weights with ``python -m oefsmc_jax import-teacher resnet34-b627a593.pth teachers/r34`` (``.pth`` needs torch;
``.npz``/``.safetensors`` of the same state dict do not); its recorded preprocessing (ImageNet mean/std, 224 input
after resize 256 + centre crop) is what this config uses, and the run refuses a teacher whose normalisation differs.
Argument keys: method, arch, per_class, rho, oe, seed, steps, teacher, ood (tfds name/split), runlocal.
"""

from oefsmc_jax.config_defaults import (
    COMMON_ARGS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    apply_common_args,
    base_config,
    parse_arg,
    source,
)


def get_config(arg: str | None = None):
    """ImageNet config."""
    a = parse_arg(arg, {**COMMON_ARGS, "arch": "imagenet_resnet34", "per_class": 10, "teacher": "",
                        "ood": "places365_small/validation", "runlocal": False, "steps": 2000})
    c = base_config()
    apply_common_args(c, a)
    c.title = f"ImageNet: {a['method']} on {a['arch']}, {a['per_class']}/class, rho={a['rho']:g}"
    size = 224
    c.data.num_classes = 1000
    c.data.image_size = size
    # torchvision's normalisation, recorded by import-teacher for its ResNets and checked against the teacher
    c.data.mean = IMAGENET_MEAN
    c.data.std = IMAGENET_STD
    c.data.pad = 16
    c.data.id = source("tfds", size, name="imagenet2012", split="train", data_dir="", lazy=True,
                       center_crop_fraction=0.875)
    c.data.test = source("tfds", size, name="imagenet2012", split="validation", data_dir="", lazy=False,
                         center_crop_fraction=0.875)
    ood_name, _, ood_split = a["ood"].partition("/")
    c.data.ood = source("tfds", size, name=ood_name, split=ood_split or "validation", data_dir="", lazy=False,
                        label_key="", max_examples=20000, center_crop_fraction=0.875)
    c.teacher.checkpoint = a["teacher"]
    c.method.prune_ratio = 0.3
    c.train.batch_id = 128
    c.train.batch_ood = 128
    c.train.log_every = 50
    c.train.ckpt_every = 250
    c.oe.eval_every = 200
    c.oe.heldout = 2000
    c.oe.size_cap = 20000
    c.eval.batch_size = 500
    if a["runlocal"]:
        c.train.steps = 10
        c.train.batch_id = 8
        c.train.batch_ood = 8
        c.train.log_every = 5
        c.oe.eval_every = 5
        c.oe.heldout = 16
        c.eval.latency = False
    return c
