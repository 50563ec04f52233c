"""The footprint estimate torpord prices a model at before its worker measures it."""

from __future__ import annotations


def test_staging_is_four_chunks_at_most_and_no_larger_than_the_weights() -> None:
    """The host bytes torpord counts for a runtime's staging buffers (and sends the worker as
    its limit): four disk-ring chunks of at most 64 MiB, or on CUDA the deep resume's stager
    when that is larger; a small model's buffers are no larger than its weights."""
    from torpor.scheduler.footprint import staging_bytes

    mib = 1 << 20
    assert staging_bytes(140 << 30, cuda=True) == 4 * 64 * mib  # a 70B model: 256 MiB
    assert staging_bytes(140 << 30, cuda=False) == 4 * 64 * mib
    assert staging_bytes(3 * mib, cuda=False) == 4 * 4 * mib  # 2 MiB-aligned pieces
    assert staging_bytes(3 * mib, cuda=True) == 14 * 4 * mib  # the stager's 14 buffers


def test_a_snapshot_write_stages_one_chunk_on_cuda_and_nothing_on_cpu(tmp_path) -> None:
    from torpor.scheduler.footprint import estimate
    from torpor.worker.engine.demo import DemoSpec, make_demo

    model = make_demo(tmp_path / "m", DemoSpec(layers=2, hidden=128, vocab=512))
    on_cpu = estimate(model, "float32", 4, 256, cuda=False)
    on_cuda = estimate(model, "float32", 4, 256, cuda=True)
    assert on_cpu.write_staging == 0
    assert 0 < on_cuda.write_staging <= on_cuda.staging
    assert on_cuda.write_staging >= on_cuda.weights  # one buffer holds the largest piece
