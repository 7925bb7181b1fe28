"""Progress on long work: a line when something changed (images, shards, the workers' masked
forwards within an image), a heartbeat otherwise, and an ETA from a smoothed rate."""

from __future__ import annotations

import pytest
import torch

from unioncam.engine import masked_inputs
from unioncam.service import runner


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(runner.time, "monotonic", c)
    return c


def lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("[unioncam]")]


def test_a_line_only_when_something_changed_or_as_a_heartbeat(clock, capsys):
    line = runner.ProgressLine(total_images=8, total_shards=2, already=0, already_shards=0, interval=10)
    for _ in range(60):  # the first image runs for 5 minutes: no new image, forwards moving
        clock.now += 5
        line.show(0, 0, 0, forwards=0)
    assert len(lines(capsys)) == 60 * 5 // 60  # nothing changed: a heartbeat every 6 × 10 s
    for i in range(60):
        clock.now += 5
        line.show(0, 0, 0, forwards=100 * (i + 1), needed=7000)
    shown = lines(capsys)
    assert len(shown) == 30 and "masked forwards" in shown[-1]  # changes, at most every 10 s
    clock.now += 1
    line.show(1, 0, 0, force=True, forwards=7200, needed=7000)  # a finished shard always prints
    assert "1/8 images (12%) | 7000/7000 masked forwards of the current images | 0/2 shards" in lines(capsys)[-1]


def test_the_eta_comes_from_a_smoothed_rate(clock, capsys):
    line = runner.ProgressLine(total_images=100, total_shards=1, already=0, already_shards=0, interval=1)
    clock.now += 10
    line.show(10, 0, 0)  # 1 img/s
    assert "1.00 img/s | ETA 1m30s" in lines(capsys)[-1]
    clock.now += 1
    line.show(20, 0, 0)  # a burst of 10 img/s moves the estimate by ALPHA only: 0.3 × 10 + 0.7 × 1 = 3.7
    assert "3.70 img/s" in lines(capsys)[-1]
    assert line.rate == pytest.approx(runner.ProgressLine.ALPHA * 10 + (1 - runner.ProgressLine.ALPHA) * 1)


def test_masked_forwards_are_counted_within_an_image():
    import unioncam

    loaded = unioncam.load("tiny_cnn")
    before = masked_inputs()
    torch.manual_seed(0)
    unioncam.explain(loaded, torch.rand(1, 3, 64, 64), "scorecam", batch_size=4, skip_constant=False)
    assert masked_inputs() - before == 16  # one masked input per channel of features.4


def test_a_shard_whose_count_is_unknown_never_shows_more_done_than_total(clock, capsys):
    line = runner.ProgressLine(total_images=0, total_shards=1, already=0, already_shards=0, interval=1)
    clock.now += 2
    line.show(1, 1, 0, force=True)  # a non-tar shard: counted 0, its one error record is "done"
    assert "1/1 images (100%)" in lines(capsys)[-1]


def test_the_worker_knows_exactly_how_many_forwards_a_batch_of_images_needs(tmp_path):
    from service_data import make_shards

    from unioncam.data.shards import iter_samples
    from unioncam.ops import is_constant
    from unioncam.service import EvalConfig
    from unioncam.service.worker import ShardEvaluator

    shard = make_shards(tmp_path / "shards", n_images=1, shard_size=1)[0]
    cfg = EvalConfig(shards=str(shard), out=str(tmp_path / "run"), model="tiny_cnn", methods=["gradcam", "scorecam"],
                     metrics=["ad", "insdel"], insdel_steps=8, report=False).resolved()
    ev = ShardEvaluator(cfg, "cpu")
    x = next(iter(iter_samples(str(shard), ev.size)))["image"][None]
    acts: list[torch.Tensor] = []
    layer = ev.model.net.get_submodule(ev.loaded.target_layer)
    handle = layer.register_forward_hook(lambda _m, _i, out: acts.append(out))
    with torch.no_grad():
        ev.model(x)
    handle.remove()
    live = int((~is_constant(acts[0])).sum())  # Score-CAM's channels with a non-constant map on this image
    assert 0 < live <= 16
    assert ev.forwards_needed(x) == live + 2 * (2 + 2 * 9)  # per map: Y, O, 2 curves of 8 + 1 points
    before = masked_inputs()
    ev.evaluate(str(shard), cfg.out)
    assert masked_inputs() - before == ev.forwards_needed(x)  # the count reaches its total, exactly
    assert ev.needed == ev.forwards_needed(x) and masked_inputs() - ev.batch_start == ev.needed

    # SS-CAM's count follows its options (CAM.masked_forwards): every channel not 0 everywhere, once per
    # noise sample
    cfg = EvalConfig(shards=str(shard), out=str(tmp_path / "ss"), model="tiny_cnn", methods=["sscam"],
                     metrics=["ad"], report=False).resolved()
    ev = ShardEvaluator(cfg, "cpu")
    conv = ev.model.net.features[3]
    with torch.no_grad():  # one channel constant 1 after the ReLU: not 0 everywhere, though constant
        conv.weight[0] = 0
        conv.bias[0] = 1.0
    acts.clear()
    handle = ev.model.net.get_submodule(ev.loaded.target_layer).register_forward_hook(
        lambda _m, _i, out: acts.append(out))
    with torch.no_grad():
        ev.model(x)
    handle.remove()
    nonzero = int(acts[0].flatten(2).ne(0).any(2).sum())
    assert nonzero == int((~is_constant(acts[0])).sum()) + 1  # the count tells the two apart
    assert ev.forwards_needed(x) == nonzero * 35 + 2  # TorchCAM's 35 samples, then Y and O
    before = masked_inputs()
    ev.evaluate(str(shard), cfg.out)
    assert masked_inputs() - before == ev.forwards_needed(x)


def test_the_eta_moves_within_a_long_batch_of_images(clock, capsys):
    line = runner.ProgressLine(total_images=10, total_shards=1, already=0, already_shards=0, interval=1)
    clock.now += 10
    line.show(1, 0, 0)  # 0.1 img/s: 9 images left, 90 s
    assert "ETA 1m30s" in lines(capsys)[-1]
    clock.now += 5
    line.show(1, 0, 0, forwards=500, needed=1000, partial=0.5)  # half of the next image's forwards done
    last = lines(capsys)[-1]
    assert "500/1000 masked forwards" in last and "ETA 1m25s" in last


def test_finished_shards_print_at_most_a_line_a_second_and_the_end_always(clock, capsys):
    line = runner.ProgressLine(total_images=1000, total_shards=1000, already=0, already_shards=0, interval=10)
    for i in range(1, 301):  # 300 shards finish within 3 s (64 workers on one-image shards)
        clock.now += 0.01
        line.show(i, i, 0, force=True)
    assert len(lines(capsys)) == 2  # at 1.01 s and 2.02 s after the line started
    line.show(300, 300, 0, final=True)  # the last state prints even 10 ms after a line
    assert "300/1000 images (30%) | 300/1000 shards" in lines(capsys)[-1]
