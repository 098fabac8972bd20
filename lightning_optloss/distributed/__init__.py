"""How OptimizeLoss reaches gradients under each Lightning strategy: the only place that knows DDP, FSDP1,
FSDP2 and DeepSpeed, and the shard layouts of their gradients."""
