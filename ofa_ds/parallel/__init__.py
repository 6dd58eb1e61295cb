"""Model parallelism applied to the plain OFA model: process groups (groups.py), Megatron tensor parallelism
(tensor.py), DeepSpeed pipeline stages (pipeline.py), activation checkpointing (checkpointing.py)."""
