import pytest

from ofa_ds.data.sampler import DistributedVLSampler, Shuffle


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_shuffle_is_a_permutation(n):
    s = Shuffle(n, seed=7)
    for epoch in range(2):
        assert sorted(s(epoch, i) for i in range(n)) == list(range(n))


def test_shuffle_depends_on_seed_and_epoch():
    a = [Shuffle(1000, 7)(0, i) for i in range(1000)]
    assert a == [Shuffle(1000, 7)(0, i) for i in range(1000)]
    assert a != [Shuffle(1000, 7)(1, i) for i in range(1000)]
    assert a != [Shuffle(1000, 8)(0, i) for i in range(1000)]
    assert a != list(range(1000))
    assert Shuffle(10**9, 7)(3, 10**9 - 1) < 10**9  # no per-epoch array: any n is cheap


def test_ranks_partition_each_epoch():
    n, mb, dp = 50, 4, 3
    samplers = [DistributedVLSampler(n, dp_rank=r, dp_size=dp, micro_batch=mb, seed=1) for r in range(dp)]
    refs = [ref for step in range(30) for s in samplers for ref in s.micro_batch_rows(step)]  # 360 rows, 7.2 epochs
    for epoch in range(7):
        rows = [r.row for r in refs if r.epoch == epoch]
        assert sorted(rows) == list(range(n))
        assert sorted(r.position for r in refs if r.epoch == epoch) == list(range(n))


def test_extras_every_8th_row_of_a_rank():
    n, mb, dp = 100, 4, 2
    samplers = [DistributedVLSampler(n, dp_rank=r, dp_size=dp, micro_batch=mb, seed=1) for r in range(dp)]
    cycles = []
    for step in range(20):
        per_rank = [[ref.extra_cycle for ref in s.micro_batch_rows(step)] for s in samplers]
        for c in per_rank:
            assert c[:3] == [None] * 3
        # with micro_batch 4: the rank's 8th row is the last of every other micro-batch, on every rank alike
        assert [c[3] is not None for c in per_rank] == [step % 2 == 1] * dp
        cycles += [x for c in per_rank for x in c if x is not None]
    assert sorted(cycles) == list(range(20))  # dense and unique over ranks


def test_resume_position():
    s = DistributedVLSampler(10, dp_rank=0, dp_size=2, micro_batch=3, seed=0)
    assert s.step_of(0) == 0 and s.step_of(18) == 3
    with pytest.raises(ValueError, match="multiple of micro_batch x dp_size = 6"):
        s.step_of(4)
    with pytest.raises(ValueError, match="dp_rank=2"):
        DistributedVLSampler(10, dp_rank=2, dp_size=2, micro_batch=3, seed=0)
