"""Every rank is captured in its own process, as a real job runs it.

Module-level state of the user's code starts afresh for every rank: a counter that hands out
offsets per call (right only when all ranks share one process) is caught, a cache filled on first
call still works. Errors and crashes in a rank's process come back naming the rank and the line.
"""

import functools
import inspect
import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gg_notebook as gg
from gg_notebook.capture import CaptureError
from gg_notebook.capture.forked import RemoteTraceback, fork_available
from gg_notebook.problem import Problem, ProblemError, Replicate, Shard

pytestmark = pytest.mark.skipif(not fork_available(), reason="per-rank processes need fork")

HERE = "test_rank_processes.py"


def line_of(fn, text):
    lines, start = inspect.getsourcelines(fn)
    for i, l in enumerate(lines):
        if text in l:
            return f"{HERE}:{start + i}"
    raise AssertionError(text)


def embedding(ids, weight):
    return F.embedding(ids, weight)


def embedding_problem(fn, W=2):
    g = torch.Generator().manual_seed(0)
    return Problem(sequential=embedding, distributed=fn,
                   inputs=(torch.randint(0, 16, (2, 5), generator=g), torch.randn(16, 4, generator=g)),
                   placements=(Replicate(), Shard(0)), world_size=W, input_names=("ids", "weight"))


def masked_lookup(ids, weight, start, group=None):
    end = start + weight.shape[0]
    foreign = (ids < start) | (ids >= end)
    local = ids.clone() - start
    local[foreign] = 0
    out = F.embedding(local, weight)
    out[foreign, :] = 0.0
    dist.all_reduce(out, group=group)
    return out


# ------------------------------------------------------------------ module-level counters: wrong


_next_vocab_row = 0


def claim_vocab_rows(n):
    """Hands out the next n vocabulary rows: each rank 'claims' its range by calling this."""
    global _next_vocab_row
    start = _next_vocab_row
    _next_vocab_row += n
    return start


def embedding_with_global_counter(ids, weight):
    return masked_lookup(ids, weight, claim_vocab_rows(weight.shape[0]))


class ShardAllocator:
    slots = itertools.count()  # class attribute: one counter per process


def embedding_with_class_counter(ids, weight):
    start = next(ShardAllocator.slots) * weight.shape[0]
    return masked_lookup(ids, weight, start)


def embedding_with_rank(ids, weight):
    return masked_lookup(ids, weight, dist.get_rank() * weight.shape[0])


def test_rank_offsets_from_the_rank_are_proved():
    assert gg.verify(embedding_problem(embedding_with_rank)).status is gg.Status.PROVED


@pytest.mark.parametrize("fn", [embedding_with_global_counter, embedding_with_class_counter])
def test_module_level_counter_is_not_proved(fn):
    # In a real job every rank is a fresh process: every rank claims rows from 0, so rank 1 looks
    # up the wrong rows. (Traced one after the other in one process, rank 1 would claim the next
    # range and the program would look right.)
    global _next_vocab_row
    _next_vocab_row = 0
    ShardAllocator.slots = itertools.count()
    result = gg.verify(embedding_problem(fn))
    assert result.status is gg.Status.REFUTED, str(result)
    assert result.stats["capture_mode"] == "processes"
    # nothing the ranks did leaked into this process either
    assert _next_vocab_row == 0 and next(ShardAllocator.slots) == 0


# ------------------------------------------------------------------ module-level caches: fine


_groups: dict = {}


def tensor_parallel_group():
    """Created on first use and cached, as Megatron's parallel_state does."""
    if "tp" not in _groups:
        _groups["tp"] = dist.new_group(list(range(dist.get_world_size())))
    return _groups["tp"]


@functools.lru_cache(maxsize=None)
def vocab_range(rows, rank):
    return rank * rows, (rank + 1) * rows


def embedding_with_cached_group(ids, weight):
    start, _ = vocab_range(weight.shape[0], dist.get_rank())
    return masked_lookup(ids, weight, start, group=tensor_parallel_group())


@pytest.mark.parametrize("W", [2, 4])
def test_module_level_cache_filled_on_first_call_is_proved(W):
    _groups.clear()
    vocab_range.cache_clear()
    result = gg.verify(embedding_problem(embedding_with_cached_group, W))
    assert result.status is gg.Status.PROVED, str(result)
    assert _groups == {}  # filled in the ranks' processes only


# ------------------------------------------------------------------ errors and crashes in a rank's process


def fails_on_rank_1(ids, weight):
    if dist.get_rank() == 1:
        weight = weight @ weight  # [8, 4] @ [8, 4]
    return masked_lookup(ids, weight, dist.get_rank() * weight.shape[0])


def test_error_in_a_rank_process_names_the_rank_and_line():
    with pytest.raises(CaptureError) as ei:
        gg.verify(embedding_problem(fails_on_rank_1), capture="processes")
    e = ei.value
    line = line_of(fails_on_rank_1, "weight = weight @ weight")
    assert e.rank == 1 and e.source.endswith(line)
    assert str(e).startswith("rank 1 raised") and line in str(e)
    assert isinstance(e.__cause__, RemoteTraceback) and "fails_on_rank_1" in str(e.__cause__)


def exits_on_rank_1(ids, weight):
    if dist.get_rank() == 1:
        os._exit(3)
    return embedding_with_rank(ids, weight)


def crashes_on_rank_1(ids, weight):
    if dist.get_rank() == 1:
        import ctypes

        ctypes.string_at(0)  # segmentation fault
    return embedding_with_rank(ids, weight)


@pytest.mark.parametrize("fn,how", [(exits_on_rank_1, "exited with code 3"),
                                    (crashes_on_rank_1, "was killed by signal SIGSEGV")])
def test_a_rank_process_that_dies_is_an_error_naming_the_rank(fn, how):
    with pytest.raises(CaptureError) as ei:
        gg.verify(embedding_problem(fn, W=4))
    assert ei.value.rank == 1
    assert str(ei.value).startswith(f"rank 1's capture process {how}"), str(ei.value)


def prints_per_rank(ids, weight):
    print(f"hello from rank {dist.get_rank()}")
    return embedding_with_rank(ids, weight)


def test_output_of_the_ranks_is_shown_in_rank_order(capsys):
    gg.verify(embedding_problem(prints_per_rank, W=4))
    out = capsys.readouterr().out
    assert out.splitlines() == [f"hello from rank {r}" for r in range(4)]


# ------------------------------------------------------------------ modes


def test_stats_say_how_the_ranks_were_captured():
    st = gg.verify(embedding_problem(embedding_with_rank, W=4)).stats
    assert st["capture_mode"] == "processes"
    assert st["capture_workers"] == min(len(os.sched_getaffinity(0)), 5)
    assert len(st["capture_rank_s"]) == 4 and all(s > 0 for s in st["capture_rank_s"])


def test_in_process_fallback_still_works():
    result = gg.verify(embedding_problem(embedding_with_rank), capture="inprocess")
    assert result.status is gg.Status.PROVED
    assert result.stats["capture_mode"] == "inprocess" and result.stats["capture_workers"] == 1
    assert len(result.stats["capture_rank_s"]) == 2
    with pytest.raises(ProblemError, match="capture must be one of"):
        gg.verify(embedding_problem(embedding_with_rank), capture="threads")


def test_without_fork_auto_captures_in_process(monkeypatch):
    import gg_notebook.capture.programs as programs

    monkeypatch.setattr(programs, "fork_available", lambda: False)
    result = gg.verify(embedding_problem(embedding_with_rank))
    assert result.status is gg.Status.PROVED and result.stats["capture_mode"] == "inprocess"
    with pytest.raises(ProblemError, match="needs the fork start method"):
        gg.verify(embedding_problem(embedding_with_rank), capture="processes")
