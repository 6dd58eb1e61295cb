"""ofa-ds: OFA-style unified multimodal seq2seq pretraining on DeepSpeed + Megatron."""

__version__ = "0.1.0"
