"""Training: the device mesh (``parallel``), optimizers (``optim``), a method's fine-tuning recipe (``recipe``), the
data-parallel train step (``step``), the loop and :func:`~oefsmc_jax.training.train.make_trainer`, the one owner of
the step (``train``), and Orbax checkpoints (``checkpoint``)."""
