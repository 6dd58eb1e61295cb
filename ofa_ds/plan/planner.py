"""`ofa-ds plan PRESET --nodes N --gpus-per-node G --gpu-memory-gb M --global-batch B`: the layouts that fit, best
first.

Enumerates TP (within a node, dividing the heads and FFN width) x PP (ZeRO-0/1 only, as DeepSpeed's pipeline
engine) x ZeRO stage x micro-batch x activation checkpointing x optimizer offload. Memory per rank is
plan/memory.py's. Step time is a roofline at a stated MFU:

- compute: the FLOPs function's count for the rank's share of an update (ResNet replicated over TP, everything else
  divided by TP x PP) at MFU x the GPU's dense peak;
- pipeline bubble: (PP - 1) / (pipeline micro-batches + PP - 1) of the compute (1F1B; every stream of every
  micro-batch is a pipeline micro-batch);
- TP: two all-reduces per encoder layer and three per decoder layer in the forward, as many in the backward, of
  the (B, T, D) activations, at the intra-node bandwidth, not overlapped (Megatron without sequence parallelism);
- ZeRO: the gradient reduce-scatter (and for ZeRO-3 the two parameter all-gathers) over the data-parallel ranks,
  at the inter-node bandwidth when the DP group spans nodes, overlapped with the backward as DeepSpeed's
  overlap_comm does (only what exceeds the backward's compute is added).

Not modelled: the optimizer step's own time, kernel launch overheads, stragglers, offload's PCIe traffic (offload
layouts are priced as if the host kept up), network contention between concurrent groups.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field

from ofa_ds.config import ConfigError, ModelConfig
from ofa_ds.plan.memory import GIB, counts, model_states, stream_activations
from ofa_ds.train.flops import StreamShape, resnet_flops, train_flops
from ofa_ds.train.metrics import GPU_PEAK_TFLOPS

CHECKPOINTING = ("none", "layers")


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float
    intra_node_gbps: float = 300.0  # GB/s per GPU, one direction (A100 NVLink: 300)
    inter_node_gbps: float = 25.0  # GB/s per GPU (8 x 200 Gb/s HDR InfiniBand per node)
    peak_tflops: float | None = None  # per GPU; None: the A100 table

    def validate(self) -> None:
        for k in ("nodes", "gpus_per_node", "gpu_memory_gb", "intra_node_gbps", "inter_node_gbps"):
            if not getattr(self, k) > 0:
                raise ConfigError(f"cluster: {k}={getattr(self, k)} must be > 0")

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Batch:
    """One update's VL rows and the stream shapes of a micro-batch of `micro` rows (the loader's: 2 v1 examples
    per row sharing one image, 4 v2 examples per 8 rows)."""

    global_batch: int
    image_size: int = 384
    patches: int = 196
    src_len: int = 32
    tgt_len: int = 16
    v2_image_size: int = 256
    v2_src_len: int = 32
    v2_tgt_len: int = 256  # image infilling's code window (code_image_size // 8) ** 2

    def per_row(self) -> list[tuple[StreamShape, float, float]]:
        """[(the shape of one example, examples per VL row, distinct images per VL row)] of each stream."""
        grid = (self.v2_image_size // 16) ** 2
        return [
            (StreamShape(1, self.image_size, self.patches, self.src_len, self.tgt_len), 2.0, 1.0),
            (StreamShape(1, self.v2_image_size, grid, self.v2_src_len, self.v2_tgt_len), 0.5, 0.5),
        ]

    def streams(self, micro: int) -> list[StreamShape]:
        """The stream shapes of one micro-batch of `micro` rows (the one with v2 examples, when some have none)."""
        out = [StreamShape(2 * micro, self.image_size, self.patches, self.src_len, self.tgt_len, images=micro)]
        v2 = (micro // 8) * 4 or (4 if micro % 8 else 0)  # every 8th row of a rank adds 4
        if v2:
            grid = (self.v2_image_size // 16) ** 2
            out.append(StreamShape(v2, self.v2_image_size, grid, self.v2_src_len, self.v2_tgt_len))
        return out


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch: int
    activation_checkpointing: str
    offload: bool
    memory_gib: dict = field(default_factory=dict)
    step_time_s: float = 0.0
    samples_per_s: float = 0.0
    fits: bool = False


def evaluate(
    cfg: ModelConfig,
    cluster: Cluster,
    batch: Batch,
    layout: Layout,
    *,
    precision: str = "bf16",
    mfu: float = 0.4,
    zero_config: dict | None = None,
) -> Layout:
    """Fill in the layout's memory and step time."""
    c = counts(cfg, layout.tp, layout.pp)
    states = model_states(
        c, dp=layout.dp, zero=layout.zero_stage, precision=precision, offload=layout.offload, zero_config=zero_config
    )
    streams = batch.streams(layout.micro_batch)
    every = 0 if layout.activation_checkpointing == "none" else 1
    held = _stage_layers(cfg, layout.pp)
    tied = layout.tp == 1 and layout.pp == 1 and layout.zero_stage < 3  # SharedEmbedding.tie (engine.build_model)
    acts = max(
        stream_activations(
            cfg,
            s,
            tp=layout.tp,
            precision=precision,
            attention="triton",
            checkpoint_every=every,
            layers=held,
            tied=tied,
        )
        for s in streams
    )
    acts *= min(layout.pp, _pipe_micro(batch, layout))  # 1F1B: the first stage holds up to PP micro-batches
    memory = {**states, "activations": acts}
    memory["total"] = sum(memory.values())
    layout.memory_gib = {k: round(v / GIB, 3) for k, v in memory.items()}
    layout.fits = memory["total"] <= cluster.gpu_memory_gb * 1e9
    layout.step_time_s = step_time(cfg, cluster, batch, layout, precision=precision, mfu=mfu)
    layout.samples_per_s = batch.global_batch / layout.step_time_s
    return layout


def _stage_layers(cfg: ModelConfig, pp: int) -> tuple[int, int]:
    """(encoder, decoder) layers of the stage holding the most, for activations: an even split of the layers."""
    if pp == 1:
        return cfg.encoder_layers, cfg.decoder_layers
    per = -(-(cfg.encoder_layers + cfg.decoder_layers) // pp)
    return min(per, cfg.encoder_layers), max(0, per - cfg.encoder_layers)


def _pipe_micro(batch: Batch, layout: Layout) -> int:
    accumulation = batch.global_batch // (layout.micro_batch * layout.dp)
    return accumulation * len(batch.streams(layout.micro_batch))


def step_time(cfg: ModelConfig, cluster: Cluster, batch: Batch, layout: Layout, *, precision: str, mfu: float) -> float:
    peak = (cluster.peak_tflops or GPU_PEAK_TFLOPS["A100"][precision]) * 1e12
    rows = batch.global_batch / layout.dp  # VL rows per data-parallel rank and update
    per_row = batch.per_row()  # [(shape of one example, examples per row, images per row)]
    resnet = sum(images * _resnet_all(cfg, s) for s, _, images in per_row)  # once per distinct image, on every TP rank
    model = sum(n * train_flops(cfg, [s]) for s, n, _ in per_row) - sum(n * _resnet_all(cfg, s) for s, n, _ in per_row)
    if layout.activation_checkpointing != "none":
        model *= 4 / 3  # the layers' forward runs again in the backward (counted as time, not as model FLOPs)
    compute = rows * (resnet + model / (layout.tp * layout.pp)) / (peak * mfu)
    m = _pipe_micro(batch, layout)
    bubble = compute * (layout.pp - 1) / (m + layout.pp - 1) if layout.pp > 1 else 0.0
    a = 2 if precision != "fp32" else 4
    tp_comm = 0.0
    if layout.tp > 1:  # (B, T, D) all-reduced twice per encoder and three times per decoder layer, forward and back
        tokens = sum(
            n * (cfg.encoder_layers * 2 * (s.patches + s.src_len) + cfg.decoder_layers * 3 * s.tgt_len)
            for s, n, _ in per_row
        )
        ring = 2 * (layout.tp - 1) / layout.tp
        tp_comm = rows * 2 * tokens * cfg.embed_dim * a * ring / (layout.pp * cluster.intra_node_gbps * 1e9)
    dp_comm = 0.0
    if layout.dp > 1:
        params = counts(cfg, layout.tp, layout.pp).params
        spans_nodes = layout.tp * layout.dp > cluster.gpus_per_node
        bw = (cluster.inter_node_gbps if spans_nodes else cluster.intra_node_gbps) * 1e9
        ring = (layout.dp - 1) / layout.dp
        grad_bytes = 4 if precision in ("bf16", "fp32") else 2  # configs/ds reduce bf16 gradients in fp32
        volume = grad_bytes * params * (2 if layout.zero_stage < 2 else 1)  # all-reduce vs reduce-scatter
        if layout.zero_stage == 3:  # a forward and a backward all-gather per stream of every micro-batch
            volume += 2 * a * params * m
        dp_comm = volume * ring / bw
    backward = compute * 2 / 3
    return compute + bubble + tp_comm + max(0.0, dp_comm - backward)


def _resnet_all(cfg: ModelConfig, s: StreamShape) -> int:
    """Training FLOPs of one example's ResNet (stem without an input gradient), as train_flops counts them."""
    stem, rest = resnet_flops(cfg.resnet_layers, s.image_size)
    return 2 * stem + 3 * rest


def candidates(cfg: ModelConfig, cluster: Cluster, batch: Batch, micro_batches: list[int]) -> list[Layout]:
    out = []
    for tp, pp in itertools.product(_powers(cluster.gpus_per_node), _powers(cluster.gpus)):
        if cfg.heads % tp or cfg.ffn_dim % tp or pp > cfg.encoder_layers + cfg.decoder_layers:
            continue
        if cluster.gpus % (tp * pp):
            continue
        dp = cluster.gpus // (tp * pp)
        for zero, micro, ckpt, offload in itertools.product((1, 2, 3), micro_batches, CHECKPOINTING, (False, True)):
            if (pp > 1 and zero > 1) or batch.global_batch % (micro * dp):
                continue
            out.append(Layout(tp, pp, dp, zero, micro, ckpt, offload))
    return out


def _powers(n: int) -> list[int]:
    return [2**i for i in range(n.bit_length()) if n % 2**i == 0]


def plan(
    cfg: ModelConfig,
    cluster: Cluster,
    batch: Batch,
    *,
    precision: str = "bf16",
    mfu: float = 0.4,
    micro_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
    zero_config: dict | None = None,
) -> list[Layout]:
    """Every candidate layout, evaluated; those that fit first, fastest first (offload last among equals)."""
    cluster.validate()
    if batch.global_batch < 1:
        raise ConfigError(f"--global-batch {batch.global_batch} must be >= 1")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu} must be in (0, 1]")
    layouts = [
        evaluate(cfg, cluster, batch, lay, precision=precision, mfu=mfu, zero_config=zero_config)
        for lay in candidates(cfg, cluster, batch, list(micro_batches))
    ]
    # equal times: no offload, then the lower ZeRO stage (less traffic to hide), then the larger micro-batch
    return sorted(
        layouts,
        key=lambda lay: (
            not lay.fits,
            round(lay.step_time_s, 6),
            lay.offload,
            lay.zero_stage,
            -lay.micro_batch,
            lay.memory_gib["total"],
        ),
    )


# ---------------------------------------------------------------------------------------------------- CLI


def add_arguments(p) -> None:
    p.add_argument("preset", help="model preset (ofa_tiny ... ofa_7b) or a JSON file of ModelConfig fields")
    p.add_argument("--nodes", type=int, required=True, help="nodes of the cluster")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node")
    p.add_argument("--gpu-memory-gb", type=float, required=True, help="memory per GPU, GB (80 for A100-80GB)")
    p.add_argument("--global-batch", type=int, required=True, help="VL rows per update")
    p.add_argument(
        "--intra-node-gbps", type=float, default=300.0, help="GB/s per GPU within a node (default: %(default)s)"
    )
    p.add_argument(
        "--inter-node-gbps", type=float, default=25.0, help="GB/s per GPU between nodes (default: %(default)s)"
    )
    p.add_argument("--peak-tflops", type=float, help="dense peak per GPU (default: A100's for the precision)")
    p.add_argument(
        "--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for compute (default: %(default)s)"
    )
    p.add_argument(
        "--precision",
        choices=["bf16", "fp16", "fp32"],
        default="bf16",
        help="training precision (default: %(default)s)",
    )
    p.add_argument(
        "--deepspeed", help="a DeepSpeed JSON whose zero_optimization buckets to count (default: DeepSpeed's defaults)"
    )
    p.add_argument("--top", type=int, default=10, help="layouts printed (default: %(default)s; 0: all with --json)")
    p.add_argument("--json", action="store_true", help="print the layouts as JSON, best first")


def model_config(name: str) -> ModelConfig:
    from pathlib import Path

    from ofa_ds.config import PRESETS, model_preset

    if name in PRESETS:
        return model_preset(name)
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"{name}: neither a preset ({', '.join(PRESETS)}) nor a ModelConfig JSON file")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON ({e})") from None


def _zero_config(path: str) -> dict:
    from ofa_ds.train.ds_json import load_ds_config

    return load_ds_config(path).get("zero_optimization", {})


def run(args) -> int:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # planning needs none; DeepSpeed would print its detection
    cfg = model_config(args.preset)  # bad input raises ConfigError: cli.main reports it in one line
    cluster = Cluster(
        args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.intra_node_gbps, args.inter_node_gbps, args.peak_tflops
    )
    zero_config = _zero_config(args.deepspeed) if args.deepspeed else None
    layouts = plan(
        cfg, cluster, Batch(args.global_batch), precision=args.precision, mfu=args.mfu, zero_config=zero_config
    )
    if args.json:
        shown = layouts[: args.top] if args.top > 0 else layouts
        print(
            json.dumps(
                {
                    "preset": cfg.name,
                    "parameters": counts(cfg).total,
                    "cluster": asdict(cluster),
                    "global_batch": args.global_batch,
                    "precision": args.precision,
                    "mfu": args.mfu,
                    "layouts": [asdict(lay) for lay in shown],
                },
                indent=1,
            )
        )
        return 0
    fitting = [lay for lay in layouts if lay.fits]
    print(
        f"{cfg.name}: {counts(cfg).total:,} parameters on {cluster.nodes} x {cluster.gpus_per_node} GPUs of "
        f"{cluster.gpu_memory_gb:g} GB, global batch {args.global_batch} VL rows, {args.precision}, MFU {args.mfu}"
    )
    if not fitting:
        print(no_fit_advice(layouts, cluster))
        return 1
    print(
        f"{'TP':>3} {'PP':>3} {'DP':>4} {'ZeRO':>4} {'micro':>5} {'ckpt':>6} {'offload':>7} {'GiB':>7} "
        f"{'step s':>8} {'samples/s':>10}"
    )
    for lay in fitting[: args.top]:
        print(
            f"{lay.tp:>3} {lay.pp:>3} {lay.dp:>4} {lay.zero_stage:>4} {lay.micro_batch:>5} "
            f"{lay.activation_checkpointing:>6} {str(lay.offload):>7} {lay.memory_gib['total']:>7.1f} "
            f"{lay.step_time_s:>8.3f} {lay.samples_per_s:>10.1f}"
        )
    print(f"{len(fitting)} of {len(layouts)} layouts fit")
    return 0


def no_fit_advice(layouts: list[Layout], cluster: Cluster) -> str:
    if not layouts:
        return "no layout divides this cluster and global batch: make the global batch a multiple of the GPUs"
    best = min(layouts, key=lambda lay: lay.memory_gib["total"])
    need = best.memory_gib["total"] * GIB / 1e9
    gpus = cluster.gpus * need / cluster.gpu_memory_gb
    return (
        f"no layout fits {cluster.gpu_memory_gb:g} GB: the smallest needs {need:.1f} GB per GPU (TP {best.tp} x "
        f"PP {best.pp} x DP {best.dp}, ZeRO-{best.zero_stage}, micro-batch {best.micro_batch}, checkpointing "
        f"{best.activation_checkpointing}, offload {best.offload}); GPUs with {need:.0f} GB, or about "
        f"{gpus:.0f} GPUs of this size, would hold it"
    )


__all__ = ["Cluster", "Batch", "Layout", "evaluate", "plan", "step_time", "candidates"]
