"""Images/s of one OE-FSMC KD fine-tuning step: the project's JAX step against the same step in PyTorch.

The workload (method.md §4-5), identical on both sides:

* teacher: CIFAR ResNet-56 (option-A shortcuts), random init with BatchNorm running statistics calibrated
  on the benchmark's images (so eval mode is not the identity), or an akamaster ``.npz`` (``--teacher-npz``);
* student: the teacher with half of each block's internal width removed by L1 norm and physically shrunk
  (``l1_prune(spec, variables, 0.5)`` then ``shrink``); both backends start from the same weights;
* per step: ``B_id`` ID images (uniform, without replacement, from a class-imbalanced pool) and ``B_ood``
  OOD images (uniform from an OOD pool) of 32x32 uint8 held on the device, pad-4 random crop + horizontal
  flip, normalisation; the teacher in eval mode and the student in train mode on ``ID ∪ OOD`` (BatchNorm
  sees both); ``L = KD((1-0.9)*CE + 0.9*tau^2*KL) on ID + lambda_jd * tau^2*KL on ID ∪ OOD + eta * R``
  with ``R = mean_j w_{y~_j} CE(S(x~_j), y~_j)`` and ``y~ ~ Categorical(Gamma)`` (complementary
  distribution); SGD, momentum 0.9, weight decay 1e-4, constant learning rate.

JAX runs exactly :func:`oefsmc_jax.training.step.make_train_step` on a mesh of ``--devices`` devices (wired as
``train.finetune`` wires it, pruning-mask multipliers included). PyTorch runs the same step eagerly
(``--torch-compile`` compiles the forward and loss) with channels_last tensors and ``torch.optim.SGD``. Both
are timed in the same process, alternately, after warm-up; the median images/s over the rounds is reported
with the ratio JAX/PyTorch.

Run ``python -m benchmarks.step_throughput --help``; needs ``torch`` (see benchmarks/requirements.txt). The
package and its tests never import torch.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("this benchmark needs PyTorch: pip install -r benchmarks/requirements.txt")


from benchmarks.workload import NUM_CLASSES, Workload, make_host_data, make_teacher_and_student  # noqa: E402
from oefsmc_jax import losses
from oefsmc_jax.kernels import cpu_conv  # noqa: E402
from oefsmc_jax.methods import KD  # noqa: E402
from oefsmc_jax.models import (  # noqa: E402
    ArchSpec,
    build_model,
    count_flops,
    count_params,
    mask_multipliers,
)
from oefsmc_jax.training import xla_cpu  # noqa: E402
from oefsmc_jax.training.parallel import make_mesh, replicate  # noqa: E402
from oefsmc_jax.training.step import StepConfig, StepData, init_state, kernel_models  # noqa: E402
from oefsmc_jax.training.train import make_trainer  # noqa: E402


# ------------------------------------------------------------------------------------------ PyTorch model
class TorchBasicBlock(nn.Module):
    """CIFAR basic block, option-A shortcut (strided subsampling + zero channel padding), as in Flax."""

    def __init__(self, in_width: int, width: int, out_width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_width, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out_width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_width)
        self.stride = stride
        self.pad = (out_width - in_width) // 2, out_width - in_width - (out_width - in_width) // 2
        self.identity = stride == 1 and in_width == out_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to an NCHW (channels_last) batch."""
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.identity:
            sc = x
        else:
            sc = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, *self.pad))
        return F.relu(sc + y)


class TorchCifarResNet(nn.Module):
    """The CIFAR ResNet of an :class:`ArchSpec` (basic blocks, option A) in PyTorch; returns logits."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        if spec.family != "cifar_resnet" or spec.block != "basic" or spec.shortcut != "A":
            raise ValueError("only CIFAR ResNets with basic blocks and option-A shortcuts are supported")
        self.stem_conv = nn.Conv2d(spec.in_channels, spec.stem_width, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(spec.stem_width)
        self.blocks = nn.ModuleDict({
            spec.block_name(s, b): TorchBasicBlock(spec.block_in_width(s, b), spec.inner_widths[s][b][0],
                                                   spec.block_out_width(s, b), spec.block_stride(s, b))
            for s, b in spec.blocks()})
        self.head = nn.Linear(spec.feature_width, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised NCHW batch."""
        x = F.relu(self.stem_bn(self.stem_conv(x)))
        for block in self.blocks.values():
            x = block(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def load_flax_variables(model: TorchCifarResNet, variables: dict) -> None:
    """Copy Flax ``params``/``batch_stats`` into ``model`` (conv HWIO -> OIHW, Dense kernel transposed)."""
    params, stats = variables["params"], variables["batch_stats"]

    def t(a: Any) -> torch.Tensor:
        return torch.tensor(np.asarray(a, np.float32))

    def conv(mod: nn.Conv2d, p: dict) -> None:
        mod.weight.copy_(t(np.transpose(np.asarray(p["kernel"]), (3, 2, 0, 1))))

    def bn(mod: nn.BatchNorm2d, p: dict, s: dict) -> None:
        mod.weight.copy_(t(p["scale"]))
        mod.bias.copy_(t(p["bias"]))
        mod.running_mean.copy_(t(s["mean"]))
        mod.running_var.copy_(t(s["var"]))

    with torch.no_grad():
        conv(model.stem_conv, params["stem_conv"])
        bn(model.stem_bn, params["stem_bn"], stats["stem_bn"])
        for name, block in model.blocks.items():
            for j in (1, 2):
                conv(getattr(block, f"conv{j}"), params[name][f"conv{j}"])
                bn(getattr(block, f"bn{j}"), params[name][f"bn{j}"], stats[name][f"bn{j}"])
        model.head.weight.copy_(t(np.asarray(params["head"]["kernel"]).T))
        model.head.bias.copy_(t(params["head"]["bias"]))


# ------------------------------------------------------------------------------------------ PyTorch step
def torch_augment(images: torch.Tensor, pad: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``pad`` + random crop + random horizontal flip of uint8 NHWC ``images``, then normalise.

    Returns float32 NCHW in channels_last memory format (a permuted view of the NHWC result).
    """
    b, h, w, _ = images.shape
    dev = images.device
    padded = F.pad(images, (0, 0, pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (b, 1), device=dev)
    left = torch.randint(0, 2 * pad + 1, (b, 1), device=dev)
    rows = top + torch.arange(h, device=dev)
    cols = left + torch.arange(w, device=dev)
    cols = torch.where(torch.rand(b, 1, device=dev) < 0.5, cols.flip(-1), cols)
    out = padded[torch.arange(b, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]
    x = (out.float() / 255.0 - mean) / std
    return x.permute(0, 3, 1, 2)


def torch_oe_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, y_id: torch.Tensor, y_ood: torch.Tensor,
                  reg_w: torch.Tensor, wl: Workload) -> torch.Tensor:
    """``KD(ID) + lambda_jd * tau^2 KL(ID ∪ OOD) + eta * R(OOD)``, the formulas of ``oefsmc_jax.losses``."""
    b = y_id.shape[0]

    def kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        lt, ls = F.log_softmax(t / wl.tau, -1), F.log_softmax(s / wl.tau, -1)
        return wl.tau ** 2 * (lt.exp() * (lt - ls)).sum(-1).mean()

    base = ((1.0 - wl.kd_gamma) * F.cross_entropy(s_logits[:b], y_id)
            + wl.kd_gamma * kl(s_logits[:b], t_logits[:b]))
    jd = kl(s_logits, t_logits)
    ce_ood = F.cross_entropy(s_logits[b:], y_ood, reduction="none")
    reg = (ce_ood * reg_w[y_ood]).mean()
    return base + wl.lambda_jd * jd + wl.eta * reg


def make_torch_step(student: nn.Module, teacher: nn.Module, host: dict[str, np.ndarray], wl: Workload,
                    device: torch.device, compile_fwd: bool) -> Callable[[], torch.Tensor]:
    """The PyTorch step (data on ``device``); each call trains one step and returns the (unsynced) loss."""
    x_id = torch.tensor(host["x_id"]).to(device)
    y_id_all = torch.tensor(host["y_id"]).long().to(device)
    x_ood = torch.tensor(host["x_ood"]).to(device)
    gamma = torch.tensor(host["gamma"]).to(device)
    reg_w = torch.tensor(host["reg_weights"]).to(device)
    mean = torch.tensor(wl.mean, device=device)
    std = torch.tensor(wl.std, device=device)
    n, m = x_id.shape[0], x_ood.shape[0]
    opt = torch.optim.SGD(student.parameters(), lr=wl.lr, momentum=wl.momentum, weight_decay=wl.weight_decay)
    student.train()
    teacher.eval()

    def forward_loss(x: torch.Tensor, y_id: torch.Tensor,
                     y_ood: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
        loss = torch_oe_loss(s_logits, t_logits, y_id, y_ood, reg_w, wl)
        acc = 100.0 * (s_logits[: y_id.shape[0]].argmax(-1) == y_id).float().mean()
        return loss, acc

    fwd = torch.compile(forward_loss) if compile_fwd else forward_loss

    def step() -> torch.Tensor:
        idx = torch.randperm(n, device=device)[: wl.batch_id] if wl.batch_id <= n else \
            torch.randint(0, n, (wl.batch_id,), device=device)
        idx_ood = torch.randperm(m, device=device)[: wl.batch_ood] if wl.batch_ood <= m else \
            torch.randint(0, m, (wl.batch_ood,), device=device)
        y_ood = torch.multinomial(gamma, wl.batch_ood, replacement=True)
        x = torch.cat([torch_augment(x_id[idx], wl.pad, mean, std),
                       torch_augment(x_ood[idx_ood], wl.pad, mean, std)])
        loss, _ = fwd(x, y_id_all[idx], y_ood)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.get_total_norm([p.grad for p in student.parameters()])  # the JAX step reports it too
        opt.step()
        return loss.detach()

    return step


def torch_sync(device: torch.device) -> None:
    """Wait for queued work on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ JAX step
def make_jax_step(t_spec: ArchSpec, t_vars: dict, s_spec: ArchSpec, s_vars: dict, host: dict[str, np.ndarray],
                  wl: Workload, ndev: int | None, seed: int,
                  fusion: str = "exact") -> tuple[Callable[[], Any], Any, dict]:
    """The project's train step, built by ``train.make_trainer`` as ``train.finetune`` does, compiled under the
    XLA:CPU fusion mode ``fusion`` (``oefsmc_jax.training.xla_cpu``; ignored off the CPU).

    Returns ``(run_one_step, mesh, box)``: ``run_one_step()`` dispatches one step asynchronously and returns its
    metrics (block on them to sync); ``box['state']`` is the current train state.
    """
    mesh = make_mesh(ndev)
    fusion, wgrad = split_variant(fusion)
    recipe = KD((0.5, 0.5, 0.5), gamma=wl.kd_gamma, tau=wl.tau).recipe()  # the prune ratio is not used
    # the compile modes are fields of the step's config (the filter-gradient kernel only on a CPU mesh)
    cfg = StepConfig(batch_id=wl.batch_id, batch_ood=wl.batch_ood, pad=wl.pad, flip=True, mean=wl.mean,
                     std=wl.std, lambda_jd=wl.lambda_jd, eta=wl.eta, tau=wl.tau, bn_mode="joint",
                     cpu_fusion=fusion, cpu_wgrad=wgrad)
    optim_cfg = {"name": "sgd", "lr": wl.lr, "momentum": wl.momentum, "weight_decay": wl.weight_decay,
                 "schedule": "constant"}
    trainer = make_trainer(mesh, s_spec, t_spec, recipe, cfg, optim_cfg, 1000)
    tx, step_fn = trainer.tx, trainer.step
    data = StepData(x_id=replicate(host["x_id"], mesh), y_id=replicate(host["y_id"], mesh),
                    x_ood=replicate(host["x_ood"], mesh), id_probs=None, gamma=replicate(host["gamma"], mesh),
                    reg_weights=replicate(host["reg_weights"], mesh))
    teacher_vars, masks, mult = replicate((t_vars, s_vars["masks"], mask_multipliers(s_spec, s_vars)), mesh)
    box = {"state": replicate(init_state(s_vars, tx, seed), mesh)}

    def run_one_step() -> Any:
        box["state"], metrics = step_fn(box["state"], data, teacher_vars, masks, mult)
        return metrics

    return run_one_step, mesh, box


# ------------------------------------------------------------------------------------------ checks
def check_equivalence(t_spec: ArchSpec, t_vars: dict, s_spec: ArchSpec, s_vars: dict,
                      torch_teacher: nn.Module, torch_student: nn.Module, host: dict[str, np.ndarray],
                      wl: Workload) -> dict[str, float]:
    """Same parameter count, same logits (teacher eval, student train mode) and same loss on one fixed batch.

    Runs on CPU copies of the torch models (float32) against the JAX models at full float32 precision on the
    JAX device; returns the parameter count and the largest differences found.
    """
    n_jax = sum(int(np.size(x)) for x in jax.tree.leaves(s_vars["params"]))
    n_torch = sum(p.numel() for p in torch_student.parameters())
    assert n_jax == n_torch == count_params(s_spec), (n_jax, n_torch, count_params(s_spec))
    rng = np.random.default_rng(1)
    b = 8
    x_u8 = np.concatenate([host["x_id"][:b], host["x_ood"][:b]])
    y_id = host["y_id"][:b]
    y_ood = rng.integers(0, NUM_CLASSES, b).astype(np.int32)
    x = (x_u8.astype(np.float32) / 255.0 - np.asarray(wl.mean, np.float32)) / np.asarray(wl.std, np.float32)
    # Full float32 on the JAX side: on a GPU, XLA's default runs convolutions in TF32 (on an H200 the student's
    # logits then differ by 1.4e-3 relative from the float32 CPU reference); the timed steps keep the default.
    with jax.default_matmul_precision("highest"):
        t_j = np.asarray(build_model(t_spec).apply(t_vars, jnp.asarray(x), train=False)["logits"])
        s_j = np.asarray(build_model(s_spec).apply(s_vars, jnp.asarray(x), train=True,
                                                   mutable=["batch_stats"])[0]["logits"])
    recipe = KD((0.5, 0.5, 0.5), gamma=wl.kd_gamma, tau=wl.tau).recipe()
    reg_w = jnp.asarray(host["reg_weights"])
    base = recipe.base_loss({"logits": s_j[:b]}, {"logits": t_j[:b]}, jnp.asarray(y_id))
    jd = losses.joint_distillation("logits", {"logits": s_j}, {"logits": t_j}, wl.tau)
    reg = losses.class_dependent_regularizer(jnp.asarray(s_j[b:]), jnp.asarray(y_ood), reg_w)
    loss_j = float(base + wl.lambda_jd * jd + wl.eta * reg)
    tt = copy.deepcopy(torch_teacher).cpu().eval()
    ts = copy.deepcopy(torch_student).cpu().train()
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        t_t, s_t = tt(xt).numpy(), ts(xt).numpy()
        loss_t = float(torch_oe_loss(torch.from_numpy(s_t), torch.from_numpy(t_t),
                                     torch.from_numpy(y_id).long(), torch.from_numpy(y_ood).long(),
                                     torch.tensor(host["reg_weights"]), wl))
    rel = lambda a, c: float(np.max(np.abs(a - c)) / max(1e-6, float(np.max(np.abs(c)))))
    out = {"params": float(n_jax), "teacher_logits_rel": rel(t_t, t_j), "student_logits_rel": rel(s_t, s_j),
           "loss_jax": loss_j, "loss_torch": loss_t}
    assert out["teacher_logits_rel"] < 1e-3 and out["student_logits_rel"] < 1e-3, out
    assert abs(loss_j - loss_t) <= 1e-3 * max(1.0, abs(loss_j)), out
    return out


def check_fusion_gradients(t_spec: ArchSpec, t_vars: dict, s_spec: ArchSpec, s_vars: dict,
                           host: dict[str, np.ndarray], wl: Workload,
                           fusions: list[str]) -> dict[str, tuple[float, float]]:
    """The step's loss gradient (student in train mode, the OE-FSMC KD loss, one fixed unaugmented batch) in
    float32 under each XLA:CPU fusion mode against the same gradient in float64; returns, per mode, the relative
    L2 error over all parameters and the worst parameter tensor's max-abs error over its max-abs value."""
    rng = np.random.default_rng(2)
    b_id, b_ood = wl.batch_id, wl.batch_ood
    x_u8 = np.concatenate([host["x_id"][:b_id], host["x_ood"][:b_ood]])
    y_id = host["y_id"][:b_id].astype(np.int32)
    y_ood = rng.integers(0, NUM_CLASSES, b_ood).astype(np.int32)
    x = (x_u8.astype(np.float32) / 255.0 - np.asarray(wl.mean, np.float32)) / np.asarray(wl.std, np.float32)
    recipe = KD((0.5, 0.5, 0.5), gamma=wl.kd_gamma, tau=wl.tau).recipe()
    student, teacher = build_model(s_spec), build_model(t_spec)

    def loss(params, others, t_vars_, x_, reg_w, student=student, teacher=teacher):
        t = teacher.apply(t_vars_, x_, train=False)
        out, _ = student.apply({"params": params, **others}, x_, train=True, mutable=["batch_stats"])
        s_id, t_id = {"logits": out["logits"][:b_id]}, {"logits": t["logits"][:b_id]}
        return (recipe.base_loss(s_id, t_id, jnp.asarray(y_id))
                + wl.lambda_jd * losses.joint_distillation("logits", out, t, wl.tau)
                + wl.eta * losses.class_dependent_regularizer(out["logits"][b_id:], jnp.asarray(y_ood), reg_w))

    others = {k: v for k, v in s_vars.items() if k != "params"}
    args32 = (s_vars["params"], others, t_vars, x, host["reg_weights"])
    with jax.enable_x64(True):
        args64 = jax.tree.map(lambda a: np.asarray(a, np.float64) if np.asarray(a).dtype == np.float32 else a,
                              args32)
        ref = [np.asarray(g) for g in jax.tree.leaves(jax.jit(jax.grad(loss))(*args64))]
    assert ref[0].dtype == np.float64
    out = {}
    for fusion in fusions:
        mode, wgrad = split_variant(fusion)
        opts = xla_cpu.compiler_options("cpu", mode)
        models = kernel_models(student, teacher) if wgrad == "kernel" else (student, teacher)
        grad = jax.jit(jax.grad(functools.partial(loss, student=models[0], teacher=models[1])),
                       compiler_options=opts)
        got = [np.asarray(g, np.float64) for g in jax.tree.leaves(grad(*args32))]
        glob = float(np.sqrt(sum(np.sum((a - r) ** 2) for a, r in zip(got, ref)) / sum(np.sum(r ** 2) for r in ref)))
        worst = max(float(np.max(np.abs(a - r)) / max(1e-30, float(np.max(np.abs(r))))) for a, r in zip(got, ref))
        out[fusion] = (glob, worst)
    return out


def split_variant(variant: str, flag: str = "--cpu-fusion") -> tuple[str, str]:
    """``'exact+kernel'`` -> ``('exact', 'kernel')``: an XLA:CPU fusion mode and, after ``+``, a filter-gradient
    mode of ``oefsmc_jax.kernels.cpu_conv`` (default ``xla``); a bad part is an error naming ``flag``."""
    fusion, _, wgrad = variant.partition("+")
    return xla_cpu.check_mode(fusion, flag), cpu_conv.check_mode(wgrad or "xla", flag)


# ------------------------------------------------------------------------------------------ timing
def time_steps(run: Callable[[], Any], sync: Callable[[Any], None], steps: int) -> tuple[float, Any]:
    """Seconds for ``steps`` calls of ``run`` followed by ``sync`` of the last result."""
    t0 = time.perf_counter()
    out = None
    for _ in range(steps):
        out = run()
    if out is not None:
        sync(out)
    return time.perf_counter() - t0, out


def summarize(seconds: list[float], steps: int, images: int) -> dict[str, float]:
    """Median/min/max images/s and the median step time (ms) over rounds."""
    ips = [steps * images / s for s in seconds]
    return {"median": statistics.median(ips), "min": min(ips), "max": max(ips),
            "step_ms": 1000.0 * statistics.median(seconds) / steps}


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and backend")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (JAX, PyTorch, JAX, ...)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps per backend after the first (compiling) step")
    p.add_argument("--batch-id", type=int, default=64, help="global ID batch")
    p.add_argument("--batch-ood", type=int, default=64, help="global OOD batch")
    p.add_argument("--depth", type=int, default=56, help="teacher CIFAR ResNet depth (6n+2)")
    p.add_argument("--prune-ratio", type=float, default=0.5, help="L1 pruning ratio of each internal width")
    p.add_argument("--n-max", type=int, default=50, help="ID pool: images of the largest class")
    p.add_argument("--rho", type=float, default=10.0, help="ID pool: imbalance ratio n_max / n_min")
    p.add_argument("--n-ood", type=int, default=1000, help="OOD pool size")
    p.add_argument("--devices", type=int, default=None, help="JAX devices in the mesh (default: all)")
    p.add_argument("--torch-device", default=None,
                   help="e.g. cpu, cuda (default: cuda if available, else cpu)")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile of the forward + loss "
                   "(same as --torch eager,compile)")
    p.add_argument("--torch", default="eager", help="comma-separated PyTorch variants: eager, compile")
    p.add_argument("--cpu-fusion", default="exact,off",
                   help="comma-separated JAX variants on a CPU, each an XLA:CPU fusion mode of "
                   "oefsmc_jax.training.xla_cpu (exact = the package default, off = XLA's own emitters, fast), "
                   "optionally +kernel for the hand-written filter-gradient kernel of oefsmc_jax.kernels.cpu_conv "
                   "(e.g. exact,exact+kernel); the first is the one the ratio is quoted for. Off the CPU only "
                   "the first is used")
    p.add_argument("--teacher-npz", default=None,
                   help="akamaster teacher .npz (oefsmc_jax.convert.load_akamaster_npz) instead of random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-check", action="store_true", help="skip the logits/loss equivalence check")
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--steps and --rounds must be >= 1, --warmup >= 0")
    args.torch = [t.strip() for t in args.torch.split(",") if t.strip()]
    if args.torch_compile and "compile" not in args.torch:
        args.torch.append("compile")
    if not args.torch or any(t not in ("eager", "compile") for t in args.torch):
        p.error(f"--torch: {args.torch} must be a comma-separated list of eager, compile")
    try:
        args.cpu_fusion = ["+".join(split_variant(m.strip().lower())).removesuffix("+xla")
                           for m in args.cpu_fusion.split(",") if m.strip()]
    except ValueError as e:
        p.error(str(e))
    if not args.cpu_fusion:
        p.error("--cpu-fusion: give at least one mode")
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Build both steps, check they agree, time them alternately and print the table; returns summaries."""
    args = parse_args(argv)
    wl = Workload(batch_id=args.batch_id, batch_ood=args.batch_ood)
    torch.manual_seed(args.seed)
    tdev = torch.device(args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"jax {jax.__version__} devices: {jax.devices()}")
    print(f"torch {torch.__version__} device: {tdev}  torch.get_num_threads() = {torch.get_num_threads()}  "
          f"variants: {', '.join(args.torch)}")
    print(f"host CPUs: {os.cpu_count()}, load average (1/5/15 min) at start: {_loadavg()}")

    host = make_host_data(args.n_max, args.rho, args.n_ood, args.seed)
    t0 = time.perf_counter()
    t_spec, t_vars, s_spec, s_vars = make_teacher_and_student(
        args.depth, args.prune_ratio, host["x_id"][:128], wl, args.seed, args.teacher_npz)
    inner = [sorted({w[0] for w in st}) for st in s_spec.inner_widths]
    depth = 2 + 2 * sum(len(st) for st in t_spec.kept)
    print(f"teacher ResNet-{depth}: {count_params(t_spec):,} params, "
          f"{count_flops(t_spec, 32) / 1e6:.1f} MMACs/image; student (inner widths per stage {inner}): "
          f"{count_params(s_spec):,} params, {count_flops(s_spec, 32) / 1e6:.1f} MMACs/image "
          f"(setup {time.perf_counter() - t0:.1f}s)")
    print(f"ID pool {len(host['y_id'])} images (counts {host['counts'].tolist()}), OOD pool "
          f"{len(host['x_ood'])}; batch {wl.batch_id} ID + {wl.batch_ood} OOD = {wl.images_per_step} "
          "images/step")

    torch_teacher, torch_student = TorchCifarResNet(t_spec), TorchCifarResNet(s_spec)
    load_flax_variables(torch_teacher, t_vars)
    load_flax_variables(torch_student, s_vars)
    if not args.skip_check:
        chk = check_equivalence(t_spec, t_vars, s_spec, s_vars, torch_teacher, torch_student, host, wl)
        print(f"check: student params JAX == PyTorch == {int(chk['params']):,}; max rel. logit diff teacher "
              f"{chk['teacher_logits_rel']:.1e}, student {chk['student_logits_rel']:.1e}; loss JAX "
              f"{chk['loss_jax']:.5f} vs PyTorch {chk['loss_torch']:.5f}")
    else:
        n_t = sum(p.numel() for p in torch_student.parameters())
        n_j = sum(int(np.size(x)) for x in jax.tree.leaves(s_vars["params"]))
        assert n_t == n_j, (n_t, n_j)
        print(f"check: student params JAX == PyTorch == {n_j:,}")
    for mod in (torch_teacher, torch_student):
        mod.to(device=tdev, memory_format=torch.channels_last)

    fusions = args.cpu_fusion if jax.default_backend() == "cpu" else args.cpu_fusion[:1]
    # name -> (device description, run one step, sync, loss of the synced result)
    backends: dict[str, tuple[str, Callable[[], Any], Callable[[Any], Any], Callable[[Any], float]]] = {}
    mesh = None
    for fusion in fusions:
        run, mesh, _ = make_jax_step(t_spec, t_vars, s_spec, s_vars, host, wl, args.devices, args.seed, fusion)
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        mode = split_variant(fusion)[0]
        opts = xla_cpu.compiler_options(xla_cpu.mesh_platform(mesh), mode) if mode != "off" else None
        label = f"JAX {fusion}" if jax.default_backend() == "cpu" else "JAX"
        print(f"{label}: first step (trace + compile + run) {time.perf_counter() - t0:.1f}s on "
              f"{mesh.devices.size} device(s); compiler_options {opts}")
        jdev = f"{jax.default_backend()} x{mesh.devices.size} ({mesh.devices.flat[0].device_kind})"
        backends[label] = (jdev, run, jax.block_until_ready, lambda out: float(out["loss"]))
    if jax.default_backend() == "cpu" and not args.skip_check:
        for fusion, (glob, worst) in check_fusion_gradients(t_spec, t_vars, s_spec, s_vars, host, wl,
                                                            fusions).items():
            print(f"check: student gradient under {fusion} against float64: relative L2 error {glob:.1e}, worst "
                  f"parameter tensor {worst:.1e}")
    for mode in args.torch:
        student = copy.deepcopy(torch_student) if len(args.torch) > 1 else torch_student
        run = make_torch_step(student, torch_teacher, host, wl, tdev, mode == "compile")
        t0 = time.perf_counter()
        torch_sync(tdev)
        run()
        torch_sync(tdev)
        label = "PyTorch" + (" compile" if mode == "compile" else "")
        print(f"{label}: first step {time.perf_counter() - t0:.1f}s")
        backends[label] = (f"{tdev.type} ({mode})", run, lambda out: (torch_sync(tdev), out.item()),
                           lambda out: float(out))

    for _, run, sync, _ in backends.values():
        time_steps(run, sync, args.warmup)

    secs: dict[str, list[float]] = {k: [] for k in backends}
    last: dict[str, float] = {}
    for r in range(args.rounds):
        for name, (_, run, sync, loss_of) in backends.items():
            s, out = time_steps(run, sync, args.steps)
            secs[name].append(s)
            last[name] = loss_of(out)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in secs.items())
              + f" for {args.steps} steps each")
    if not all(np.isfinite(v) for v in last.values()):
        raise RuntimeError(f"non-finite loss: {last}")

    res = {k: summarize(v, args.steps, wl.images_per_step) for k, v in secs.items()}
    print()
    print(f"One OE-FSMC KD step, ResNet-{depth} teacher -> shrunk student, {wl.images_per_step} "
          f"images/step, {args.rounds} rounds x {args.steps} timed steps (median/min/max over rounds)")
    header = (f"{'backend':<18} {'device':<28} {'img/s median':>12} {'min':>8} {'max':>8} {'step ms':>9} "
              f"{'last loss':>10}")
    print(header)
    print("-" * len(header))
    for name, (dev, *_rest) in backends.items():
        r_ = res[name]
        print(f"{name:<18} {dev:<28} {r_['median']:>12.1f} {r_['min']:>8.1f} {r_['max']:>8.1f} "
              f"{r_['step_ms']:>9.1f} {last[name]:>10.4f}")
    jax_names = [k for k in backends if k.startswith("JAX")]
    torch_names = [k for k in backends if k.startswith("PyTorch")]
    for jn in jax_names:
        print("ratio " + ", ".join(f"{jn} / {tn}: {res[jn]['median'] / res[tn]['median']:.2f}"
                                   for tn in torch_names) + " (median images/s)")
    for jn in jax_names[1:]:
        print(f"ratio {jax_names[0]} / {jn}: {res[jax_names[0]]['median'] / res[jn]['median']:.2f}")
    ld = os.environ.get("LD_PRELOAD", "")
    print(f"allocator: {'LD_PRELOAD=' + os.path.basename(ld) if ld else 'system malloc'}")
    print(f"load average (1/5/15 min) at end: {_loadavg()} (other processes on the host skew both backends)")
    return res


if __name__ == "__main__":
    main()
