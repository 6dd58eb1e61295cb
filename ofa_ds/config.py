"""Typed configuration: the model and its named size presets.

A config is a plain dataclass; it round-trips through JSON and YAML (`to_dict` / `from_dict`), and an
unknown key or a value of the wrong type is an error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path

# OFA's "resnetXX" options all build Bottleneck stacks (OFA_SPEC 1.9.1); stages 1-3 only.
RESNET_LAYERS = {
    "resnet18": (2, 2, 2),
    "resnet34": (3, 4, 6),
    "resnet50": (3, 4, 6),
    "resnet101": (3, 4, 23),
    "resnet152": (3, 8, 36),
}
BN_MODES = ("batch", "sync", "sync_node", "frozen")
TEXT_PAD_MULTIPLE = 8  # the loader pads source and target text to multiples of it
ATTN_BACKENDS = ("auto", "reference", "sdpa", "triton")


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the key and the limit."""


# ---------------------------------------------------------------------------------------------
# dict / file round trip with strict key and type checking


def _check_types(obj) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            continue
        if not _isinstance(v, hints[f.name]):
            raise ConfigError(f"{type(obj).__name__}.{f.name}: expected {_type_name(hints[f.name])}, got {v!r}")


def _isinstance(v, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return True
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_isinstance(v, a) for a in typing.get_args(tp))
    if tp is type(None):
        return v is None
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return isinstance(v, (list, tuple)) and (not args or all(_isinstance(x, args[0]) for x in v))
    if origin is dict:
        return isinstance(v, dict)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, tp)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _from_dict(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in d.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = _from_dict(tp, v, f"{where}.{k}")
        elif typing.get_origin(tp) is tuple and isinstance(v, list):
            v = tuple(v)
        if tp is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not dataclasses.is_dataclass(tp) and not _isinstance(v, tp):
            raise ConfigError(f"{where}.{k}: expected {_type_name(tp)}, got {v!r}")
        kwargs[k] = v
    return cls(**kwargs)


def load_dict(path: str | Path) -> dict:
    """Read a JSON or YAML file into a dict."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    if path.suffix in (".yaml", ".yml"):
        d = parse_yaml(text, str(path))
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}:{e.colno}: {e.msg}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return d


def parse_yaml(text: str, where: str):
    """yaml.safe_load, a syntax error being one line: where:line:column: the problem."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        raise ConfigError(f"{where}{at}: YAML syntax: {problem}" + (f" ({context})" if context else "")) from None


def save_dict(d: dict, path: str | Path) -> None:
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(d, sort_keys=False))
    else:
        path.write_text(json.dumps(d, indent=2) + "\n")


@dataclass
class ModelConfig:
    """The OFA encoder-decoder. Defaults are OFA's pretraining configuration (OFA_SPEC 1.2)."""

    name: str = "custom"
    embed_dim: int = 256
    ffn_dim: int = 1024
    heads: int = 4
    encoder_layers: int = 4
    decoder_layers: int = 4
    resnet: str = "resnet50"
    vocab_size: int = 59457
    token_bucket_size: int = 256
    image_bucket_size: int = 42
    max_positions: int = 1024
    attn_scale_factor: float = 2.0
    code_image_size: int = 128  # decoder image-code window: code_image_size // 8 per side
    dropout: float = 0.1
    encoder_drop_path: float = 0.1
    decoder_drop_path: float = 0.1
    bn_mode: str = "batch"  # batch: per-rank statistics (OFA); sync: over all ranks; sync_node: over a node's; frozen
    attn_backend: str = "auto"  # auto: triton on CUDA, sdpa elsewhere
    pad_id: int = 1

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads

    @property
    def resnet_layers(self) -> tuple[int, int, int]:
        return RESNET_LAYERS[self.resnet]

    def validate(self) -> None:
        _check_types(self)
        if self.embed_dim % self.heads:
            raise ConfigError(f"model.heads={self.heads} does not divide model.embed_dim={self.embed_dim}")
        if self.resnet not in RESNET_LAYERS:
            raise ConfigError(f"model.resnet={self.resnet!r}; valid: {', '.join(RESNET_LAYERS)}")
        if self.bn_mode not in BN_MODES:
            raise ConfigError(f"model.bn_mode={self.bn_mode!r}; valid: {', '.join(BN_MODES)}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ConfigError(f"model.attn_backend={self.attn_backend!r}; valid: {', '.join(ATTN_BACKENDS)}")
        for k in (
            "embed_dim",
            "ffn_dim",
            "heads",
            "encoder_layers",
            "decoder_layers",
            "vocab_size",
            "token_bucket_size",
            "image_bucket_size",
            "max_positions",
        ):
            if getattr(self, k) <= 0:
                raise ConfigError(f"model.{k} must be positive, got {getattr(self, k)}")
        window = self.code_image_size // 8
        if window > self.image_bucket_size:
            raise ConfigError(
                f"model.code_image_size={self.code_image_size} gives a {window}x{window} code grid, "
                f"larger than the {self.image_bucket_size}x{self.image_bucket_size} position grid"
            )
        if 1 + window * window > self.max_positions:
            raise ConfigError("model.code_image_size too large for model.max_positions")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return _from_dict(cls, d, "model")


def _preset(name, d, f, h, le, ld, resnet) -> ModelConfig:
    return ModelConfig(name=name, embed_dim=d, ffn_dim=f, heads=h, encoder_layers=le, decoder_layers=ld, resnet=resnet)


# OFA_SPEC 2.1 for tiny..huge. Beyond Huge: head dim 128 (a size the fused attention kernel supports),
# encoder twice as deep as the decoder as in Huge, ResNet-152 backbone. Exact counts are in the README
# and pinned by tests/test_config.py.
PRESETS: dict[str, ModelConfig] = {
    p.name: p
    for p in [
        _preset("ofa_tiny", 256, 1024, 4, 4, 4, "resnet50"),
        _preset("ofa_medium", 512, 2048, 8, 4, 4, "resnet101"),
        _preset("ofa_base", 768, 3072, 12, 6, 6, "resnet101"),
        _preset("ofa_large", 1024, 4096, 16, 12, 12, "resnet152"),
        _preset("ofa_huge", 1280, 5120, 16, 24, 12, "resnet152"),
        _preset("ofa_1.5b", 1536, 6144, 12, 28, 14, "resnet152"),
        _preset("ofa_3b", 2048, 8192, 16, 34, 17, "resnet152"),
        _preset("ofa_7b", 3072, 12288, 24, 36, 18, "resnet152"),
    ]
}


def model_preset(name: str, **overrides) -> ModelConfig:
    """A copy of a named preset, optionally with fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


__all__ = ["ModelConfig", "ConfigError", "PRESETS", "model_preset", "load_dict", "save_dict", "RESNET_LAYERS"]


@dataclass
class DataConfig:
    """Batch building from a converted corpus. Defaults are OFA's pretraining settings (OFA_SPEC 4)."""

    tokenizer: str = "ofa_bpe"  # "ofa_bpe" (OFA's GPT-2 BPE) or a directory written by `ofa-ds train-tokenizer`
    image_size: int = 384  # v1 (vision-language) images
    extra_image_size: int = 256  # v2 images: image infilling, detection, blank text-infilling images
    sample_patch_num: int = 196  # v1 patches kept per sample (OFA_SPEC 1.9.3); -1 keeps all
    max_src_length: int = 80  # words of a caption / question in the source
    max_tgt_length: int = 30  # words of a caption target
    mask_ratio: float = 0.3  # text infilling: fraction of words masked
    poisson_lambda: float = 3.0  # text infilling: mean span length in words
    max_image_size: int = 512  # box coordinates are divided by this before binning
    num_bins: int = 1000
    num_codes: int = 8192
    seed: int = 7
    num_workers: int = 2

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_types(self)
        for k in ("image_size", "extra_image_size"):
            v = getattr(self, k)
            # ResNet stages 1-3 downsample by 16; image infilling blanks the centre half.
            if v <= 0 or v % 16:
                raise ConfigError(f"data.{k}={v} must be a positive multiple of 16")
        if self.sample_patch_num == 0 or self.sample_patch_num < -1:
            raise ConfigError(f"data.sample_patch_num={self.sample_patch_num} must be positive or -1 (all patches)")
        for k in ("max_src_length", "max_tgt_length", "max_image_size", "num_bins", "num_codes"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"data.{k} must be positive, got {getattr(self, k)}")
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise ConfigError(f"data.mask_ratio={self.mask_ratio} must be in [0, 1]")
        if self.poisson_lambda <= 0:
            raise ConfigError(f"data.poisson_lambda={self.poisson_lambda} must be positive")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        return _from_dict(cls, d, "data")


__all__.append("DataConfig")


@dataclass
class TrainConfig:
    """The training loop: batch geometry, learning-rate schedule, evaluation, checkpoints, logging.

    Batches count VL rows (each gives two v1 examples; every 8th row of a rank adds four v2 extras).
    The optimizer (AdamW, peak lr, betas, weight decay), gradient clipping, ZeRO stage and precision are
    DeepSpeed's and live in the DeepSpeed config."""

    steps: int = 1000  # optimizer updates
    global_batch: int = 8  # VL rows per update over all ranks = micro_batch x data-parallel ranks x accumulation
    micro_batch: int = 4  # VL rows per rank per forward/backward
    warmup_ratio: float = 0.01  # warmup updates = int(warmup_ratio x steps) (OFA_SPEC 7)
    lr_power: float = 1.0  # polynomial decay power after warmup; 1 = linear (OFA)
    end_lr: float = 0.0
    seed: int = 1  # model init and dropout; data order and augmentation use data.seed
    log_every: int = 10
    eval_every: int = 0  # updates between validations on val_corpus; 0 = never
    eval_batches: int = 4  # validation micro-batches per rank
    save_every: int = 500  # updates between checkpoints (one is also written at the end and on SIGTERM/SIGINT)
    keep_last: int = 3  # checkpoints kept; older ones are deleted once a newer one is complete
    peak_tflops: float | None = None  # per device, for MFU; None: A100/H100 table, or a measured GEMM rate on CPU
    # recompute layer activations in the backward: none, layers (every encoder and decoder layer) or every_K (layers
    # 0, K, 2K, ... of each stack)
    activation_checkpointing: str = "none"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_types(self)
        for k in ("steps", "global_batch", "micro_batch", "log_every", "eval_batches", "save_every", "keep_last"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"train.{k} must be positive, got {getattr(self, k)}")
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every={self.eval_every} must be >= 0 (0 = no validation)")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1]")
        if self.lr_power <= 0 or self.end_lr < 0:
            raise ConfigError(f"train.lr_power={self.lr_power} must be > 0 and train.end_lr={self.end_lr} >= 0")
        ac = self.activation_checkpointing
        if ac not in ("none", "layers") and not (ac.startswith("every_") and ac[6:].isdigit() and int(ac[6:]) > 0):
            raise ConfigError(f"train.activation_checkpointing={ac!r}; valid: none, layers, every_K (K >= 1)")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"train.peak_tflops={self.peak_tflops} must be positive")

    def accumulation(self, dp_size: int) -> int:
        """Micro-batches per update; an error naming the keys if the geometry does not divide."""
        per_step = self.micro_batch * dp_size
        if self.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch={self.global_batch} is not divisible by train.micro_batch="
                f"{self.micro_batch} x {dp_size} data-parallel rank(s) = {per_step}"
            )
        return self.global_batch // per_step


@dataclass
class ParallelConfig:
    """How the model is split over ranks: Megatron tensor parallelism (TP) x DeepSpeed pipeline stages (PP); the rest
    of the world is ZeRO data parallelism, dp = world size / (tensor x pipeline). TP ranks are consecutive (a node's
    GPUs), then DP, then PP (Megatron's order)."""

    tensor: int = 1  # ranks that split each layer's heads, FFN width and vocabulary
    pipeline: int = 1  # pipeline stages (deepspeed.pipe, ZeRO-0/1)
    sequence_parallel: bool = False  # Megatron sequence parallelism (needs tensor > 1)
    pipeline_partition: str = "parameters"  # parameters | uniform | type:<regex> (DeepSpeed's partition_method)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_types(self)
        for k in ("tensor", "pipeline"):
            if getattr(self, k) < 1:
                raise ConfigError(f"parallel.{k}={getattr(self, k)} must be >= 1")
        if self.sequence_parallel and self.tensor == 1:
            raise ConfigError(
                "parallel.sequence_parallel needs parallel.tensor > 1 (it splits the sequence over the "
                "tensor-parallel ranks)"
            )
        part = self.pipeline_partition
        if part not in ("parameters", "uniform") and not part.startswith("type:"):
            raise ConfigError(f"parallel.pipeline_partition={part!r}; valid: parameters, uniform, type:<regex>")

    def model_parallel(self) -> int:
        return self.tensor * self.pipeline

    def check(self, model: ModelConfig, world: int, zero_stage: int) -> None:
        """The layout against the model, the world size and the ZeRO stage, before any process group starts."""
        t, p = self.tensor, self.pipeline
        for k in ("heads", "ffn_dim"):
            if getattr(model, k) % t:
                raise ConfigError(f"parallel.tensor={t} does not divide model {k}={getattr(model, k)}")
        layers = model.encoder_layers + model.decoder_layers
        if p > layers:
            raise ConfigError(
                f"parallel.pipeline={p} stages for {model.encoder_layers}+{model.decoder_layers} "
                f"transformer layers: at most {layers}"
            )
        if p > 1 and zero_stage > 1:
            raise ConfigError(
                f"parallel.pipeline={p} with ZeRO stage {zero_stage}: DeepSpeed's pipeline engine takes "
                f"ZeRO stage 0 or 1 (set zero_optimization.stage to 1)"
            )
        if self.sequence_parallel and TEXT_PAD_MULTIPLE % t:
            raise ConfigError(
                f"parallel.sequence_parallel with parallel.tensor={t}: the loader pads target text "
                f"to multiples of {TEXT_PAD_MULTIPLE}, which the sequence split must divide "
                "(tensor 2, 4 or 8)"
            )
        self.data_parallel(world)

    def describe(self, world: int) -> str:
        return f"TP {self.tensor} x PP {self.pipeline} x DP {self.data_parallel(world)}"

    def data_parallel(self, world: int) -> int:
        """Data-parallel ranks of a world of `world` ranks; an error naming the keys if it does not divide."""
        if world % self.model_parallel():
            raise ConfigError(
                f"world size {world} is not a multiple of parallel.tensor={self.tensor} x "
                f"parallel.pipeline={self.pipeline} = {self.model_parallel()}"
            )
        return world // self.model_parallel()


@dataclass
class RunConfig:
    """One `ofa-ds pretrain` run. Relative paths are relative to the working directory."""

    model: str = "ofa_tiny"  # preset name (ofa_ds.config.PRESETS)
    model_overrides: dict = dataclasses.field(default_factory=dict)  # ModelConfig fields replacing the preset's
    corpus: str = ""  # converted corpus directory (manifest.json from `ofa-ds tsv2arrow`)
    val_corpus: str | None = None  # held-out corpus for train.eval_every
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # incl. the tokenizer
    deepspeed: str = "configs/ds/cpu_demo.json"
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    out_dir: str = "runs/ofa"  # checkpoints/, tb/, metrics.jsonl, config.yaml
    init_from: str | None = None  # OFA checkpoint (.pt) or ofa_ds export (.safetensors) to start from

    def __post_init__(self):
        _check_types(self)
        if not self.corpus:
            raise ConfigError("corpus: missing (the directory written by `ofa-ds tsv2arrow`)")
        self.model_config()  # names a bad preset or override now

    def model_config(self) -> ModelConfig:
        return _from_dict(
            ModelConfig, {**model_preset(self.model).to_dict(), **self.model_overrides}, "model_overrides"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return _from_dict(cls, d, "config")


__all__ += ["TrainConfig", "ParallelConfig", "RunConfig"]
