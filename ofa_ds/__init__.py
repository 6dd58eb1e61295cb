"""ofa-ds: OFA-style unified multimodal seq2seq pretraining on DeepSpeed (ZeRO data parallelism)."""

__version__ = "0.1.0"
