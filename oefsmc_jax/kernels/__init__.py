"""Hand-written kernels called from JAX: the CPU filter gradient of 3x3 convolutions (:mod:`.cpu_conv`)."""
