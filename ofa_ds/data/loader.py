"""The training engine's data entry point: micro-batches in the batch format for one data-parallel rank.

    from ofa_ds.data.loader import build_loader
    loader = build_loader(corpus, tokenizer, data_cfg, dp_rank=r, dp_size=w, micro_batch=b,
                          consumed_samples=state.get("consumed_samples", 0), num_workers=data_cfg.num_workers)
    for batch in loader:                # endless; one item per micro-step
        v1, v2 = batch["v1"], batch["v2"]   # Streams (dict[str, Tensor]); v2 is None without extras
        ...
        state = loader.state_dict()     # {"consumed_samples": global VL rows consumed so far}

- `corpus`: `ofa_ds.data.shards.Corpus(root)` (or anything with its row interface); `data_cfg`:
  `ofa_ds.config.DataConfig`; `tokenizer`: `load_tokenizer(data_cfg.tokenizer, num_codes=data_cfg.num_codes,
  num_bins=data_cfg.num_bins, vocab_size=model_cfg.vocab_size)` (ofa_ds.data.tokenizer), which fails unless the
  tokenizer's vocabulary is the model's.
- Every rank builds its own loader with the same arguments except `dp_rank`. A micro-step consumes
  `micro_batch * dp_size` VL rows over all ranks; each row gives 2 v1 examples (so v1 has 2 * micro_batch
  examples) and every 8th row of a rank adds 4 v2 examples (sampler.py). With micro_batch a multiple of 8 every
  micro-step has v2; otherwise v2 is None at the same micro-steps on every rank.
- Epochs follow each other without a boundary: each is a fresh shuffle of all VL rows, and a micro-batch may
  hold the end of one and the start of the next (sampler.py).
- `consumed_samples` (a multiple of micro_batch * dp_size) resumes exactly: `state_dict()` counts the batches
  handed out by this iterator, not those prefetched by workers.
- Each micro-batch is a pure function of (corpus, tokenizer, data_cfg, dp_rank, dp_size, micro_batch, step):
  every random choice (augmentation, ITM coin, negatives, span masks, patch samples) is drawn from a numpy
  Generator seeded by (seed, epoch, position) of its VL row or (seed, cycle, slot) of its extra example. Batches
  are therefore identical for any number of DataLoader workers. This departs from OFA, whose RandAugment draws
  come from a NumPy RNG seeded per epoch (so every sample of an epoch got the same augmentation).
"""

from __future__ import annotations

import atexit
import itertools
import queue
import threading

import numpy as np
import torch

from ofa_ds.config import ConfigError, DataConfig
from ofa_ds.data.collate import collate
from ofa_ds.data.sampler import DistributedVLSampler
from ofa_ds.data.tasks import DataError, Example, TaskBuilder
from ofa_ds.data.tokenizer import Tokenizer

# Seed domains: what a sample's Generator is keyed by besides the seed.
_VL, _TEXT, _IMAGE, _DETECTION = range(4)


class MicroBatches(torch.utils.data.Dataset):
    """Micro-step k of one rank -> {"v1": Stream, "v2": Stream | None}."""

    def __init__(self, corpus, tokenizer: Tokenizer, cfg: DataConfig, sampler: DistributedVLSampler):
        self.corpus, self.tok, self.cfg, self.sampler = corpus, tokenizer, cfg, sampler
        self.tasks = TaskBuilder(tokenizer, cfg, corpus.negatives)

    def __getitem__(self, step: int) -> dict:
        v1: list[Example] = []
        v2: list[Example] = []
        for ref in self.sampler.micro_batch_rows(step):
            rng = self._rng(_VL, ref.epoch, ref.position)
            v1 += _guard("vl", ref.row, self.corpus.vl, lambda row: self.tasks.vl(row, rng))
            if ref.extra_cycle is not None:
                v2 += self.extras(ref.extra_cycle)
        return {
            "v1": collate(v1, self.cfg.image_size, self.tok.pad),
            "v2": collate(v2, self.cfg.extra_image_size, self.tok.pad) if v2 else None,
        }

    def extras(self, cycle: int) -> list[Example]:
        """Extra cycle g: text rows 2g, 2g + 1, image row g, detection row g (each modulo its length)."""
        c, t = self.corpus, self.tasks
        out = []
        if len(c.text):
            for slot in range(2):
                rng = self._rng(_TEXT, cycle, slot)
                out.append(
                    _guard("text", (2 * cycle + slot) % len(c.text), c.text, lambda row: t.text_infilling(row, rng))
                )
        if len(c.image):
            out.append(_guard("image", cycle % len(c.image), c.image, t.image_infilling))
        if len(c.detection):
            rng = self._rng(_DETECTION, cycle, 0)
            out.append(_guard("detection", cycle % len(c.detection), c.detection, lambda row: t.detection(row, rng)))
        return out

    def _rng(self, domain: int, a: int, b: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, domain, a, b])


def _guard(source: str, index: int, table, build):
    """Build examples from one row; any failure names the source, row and id."""
    row = table[index]
    try:
        return build(row)
    except Exception as e:
        uid = row.get("uniq_id", row.get("image_id"))
        raise DataError(f"{source} row {index} (id {uid!r}): {type(e).__name__}: {e}") from e


def _as_is(batch):
    return batch


class _Wire(torch.utils.data.Dataset):
    """Micro-batches as worker processes hand them over. Every tensor a worker returns travels as its own
    shared-memory segment, and receiving one costs the trainer a socket handshake with that (busy) worker: about
    0.5 ms each here, 10-15 ms for a micro-batch's 19 tensors. Small fields travel pickled as numpy arrays
    instead, leaving one segment per stream (its images, already allocated in shared memory by collate)."""

    def __init__(self, batches: MicroBatches):
        self.batches = batches

    def __getitem__(self, step: int) -> dict:
        return {
            s: None if x is None else {k: v if k == "patch_images" else v.numpy() for k, v in x.items()}
            for s, x in self.batches[step].items()
        }

    @staticmethod
    def unpack(batch: dict) -> dict:
        return {s: None if x is None else {k: torch.as_tensor(v) for k, v in x.items()} for s, x in batch.items()}


_RECEIVERS: set = set()  # (done, thread) of the running hand-over threads


@atexit.register
def _stop_receivers() -> None:
    """A hand-over thread still inside torch when the interpreter tears down aborts the process ("terminate called
    without an active exception"): stop and join them first, as the DataLoader does its pin-memory thread."""
    for done, thread in list(_RECEIVERS):
        done.set()
        thread.join(timeout=60)


def _received(batches, depth: int = 2):
    """The workers' batches, taken over `depth` ahead on a thread: reading a batch's pickle and mapping its shared
    memory then overlaps the training step instead of sitting in it (as the DataLoader's pin-memory thread does
    on CUDA). The workers' errors reach the training thread at its next batch."""
    ready = queue.Queue(depth)
    done = threading.Event()

    def put(item) -> None:
        while not done.is_set():
            try:
                return ready.put(item, timeout=0.1)
            except queue.Full:
                pass

    def receive() -> None:
        try:
            while not done.is_set():
                put((_Wire.unpack(next(batches)), None))
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread
            put((None, e))

    thread = threading.Thread(target=receive, name="ofa_ds-loader", daemon=True)
    handle = (done, thread)
    _RECEIVERS.add(handle)
    thread.start()
    try:
        while True:
            batch, error = ready.get()
            if error is not None:
                raise error
            yield batch
    finally:
        done.set()
        thread.join(timeout=60)  # it finishes the batch it is receiving
        _RECEIVERS.discard(handle)


class Loader:
    """Endless iterable of this rank's micro-batches that knows how many global VL rows it has handed out."""

    def __init__(self, batches: MicroBatches, consumed_samples: int, num_workers: int):
        self.batches, self.num_workers = batches, num_workers
        self.sampler = batches.sampler
        self.sampler.step_of(consumed_samples)  # validates
        self.consumed_samples = consumed_samples

    def __iter__(self):
        start = self.sampler.step_of(self.consumed_samples)
        workers = self.num_workers > 0
        # The DataLoader draws its workers' base seed when an iterator starts: from its own generator, not the
        # global one, whose state (dropout, drop-path) a resumed run restores and must not see shifted. The batches
        # draw nothing from it (their Generators are seeded per row).
        loader = torch.utils.data.DataLoader(
            _Wire(self.batches) if workers else self.batches,
            batch_size=None,
            sampler=itertools.count(start),
            num_workers=self.num_workers,
            collate_fn=_as_is,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.batches.cfg.seed),
        )
        for batch in _received(iter(loader)) if workers else loader:
            self.consumed_samples += self.sampler.global_micro_batch
            yield batch

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}


def build_loader(
    corpus,
    tokenizer: Tokenizer,
    data_cfg: DataConfig,
    *,
    dp_rank: int,
    dp_size: int,
    micro_batch: int,
    consumed_samples: int = 0,
    num_workers: int | None = None,
) -> Loader:
    if (tokenizer.num_codes, tokenizer.num_bins) != (data_cfg.num_codes, data_cfg.num_bins):
        raise ConfigError(
            f"tokenizer has {tokenizer.num_codes} codes and {tokenizer.num_bins} bins; data config "
            f"says num_codes={data_cfg.num_codes}, num_bins={data_cfg.num_bins}"
        )
    sampler = DistributedVLSampler(
        len(corpus.vl), dp_rank=dp_rank, dp_size=dp_size, micro_batch=micro_batch, seed=data_cfg.seed
    )
    workers = data_cfg.num_workers if num_workers is None else num_workers
    return Loader(MicroBatches(corpus, tokenizer, data_cfg, sampler), consumed_samples, workers)
