"""Training: the device mesh (``parallel``), optimizers (``optim``), a method's fine-tuning recipe (``recipe``), the
data-parallel train step (``step``), a run job, :func:`~oefsmc_jax.training.train.make_trainer` (the one owner of the
step) and one run's program (``train``), a group's program (``group``), the one fine-tuning loop (``loop``) and each
run's books in it (``run_state``, ``metric_writer``), grid cells trained together (``scheduler``), and
Orbax checkpoints (``checkpoint``)."""
