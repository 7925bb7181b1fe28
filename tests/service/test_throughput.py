"""GPU-first defaults, tested on CPU: precision "auto", the memory-derived batch plan (with a faked free
memory), the fixed-shape compiled forward, prefetching, and metrics batched across methods."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from service_data import make_shards

from unioncam import explain, load
from unioncam.data.shards import prefetched
from unioncam.engine import GPU_RESERVE, gpu_plan
from unioncam.models import compiled_graphs
from unioncam.ops import autocast, resolve_precision
from unioncam.service import ConfigError, EvalConfig, read_metrics
from unioncam.service.worker import ShardEvaluator


def test_auto_precision_is_fp16_on_cuda_and_fp32_elsewhere():
    assert resolve_precision("auto", "cuda") == "fp16" and resolve_precision("auto", torch.device("cuda", 1)) == "fp16"
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("bf16", "cuda") == "bf16"
    with pytest.raises(ValueError, match="valid: auto, fp32, tf32, bf16, fp16"):
        resolve_precision("fp8", "cpu")
    lm = load("tiny_cnn")
    x = torch.rand(1, 3, 64, 64)
    a = explain(lm, x, "scorecam").maps  # default precision: auto = fp32 here
    b = explain(lm, x, "scorecam", precision="fp32").maps
    assert torch.equal(a, b)


def test_tf32_turns_tf32_on_inside_and_restores():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        with autocast(torch.device("cpu"), "tf32"):
            assert cudnn.allow_tf32 and matmul.allow_tf32
        assert not cudnn.allow_tf32 and not matmul.allow_tf32
        with autocast(torch.device("cpu"), "fp32"):
            assert not cudnn.allow_tf32
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def test_gpu_plan_from_a_memory_budget_by_hand():
    model = load("tiny_cnn").model
    # TinyCNN at 64²: conv 8×64×64 → ReLU 8×64×64 is the widest consecutive pair (2 × 32768 elements)
    per_input_fp16 = 2 * 2 * (2 * 32768) + 2 * 4 * 3 * 64 * 64
    fixed = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) + GPU_RESERVE
    plan = gpu_plan(model, (64, 64), "fp16", max_gib=0.8, free=100 << 30)
    assert (plan.per_input, plan.fixed, plan.budget) == (per_input_fp16, fixed, int(0.8 * (1 << 30)))
    fit = (int(0.8 * (1 << 30)) - fixed) // per_input_fp16
    assert plan.batch_size == fit - fit % 8 and plan.images_per_batch == min(32, plan.batch_size // 8)
    small = gpu_plan(model, (64, 64), "fp32", max_gib=4, free=int(0.9e9))  # the free memory is the cap
    assert small.budget == int(0.9 * 0.9e9) and small.batch_size < plan.batch_size
    assert gpu_plan(model, (64, 64), "fp16", max_gib=100, free=100 << 30).batch_size == 256  # the cap
    assert gpu_plan(model, (64, 64), "fp16", max_gib=0.1, free=100 << 30).batch_size == 1  # never below 1


def test_worker_derives_batches_from_the_faked_gpu_memory(tmp_path):
    cfg = EvalConfig(shards="x/*.tar", out=str(tmp_path), model="tiny_cnn", methods=["gradcam"],
                     max_gpu_memory=0.8).resolved()
    ev = ShardEvaluator(cfg, "cpu", free_memory=100 << 30)
    assert ev.plan is not None
    assert (ev.batch_size, ev.images_per_batch) == (ev.plan.batch_size, ev.plan.images_per_batch)
    given = ShardEvaluator(EvalConfig(**{**cfg.__dict__, "batch_size": 16}).resolved(), "cpu", free_memory=100 << 30)
    assert given.batch_size == 16  # explicit sizes win
    assert ShardEvaluator(cfg, "cpu").batch_size == 4 and ShardEvaluator(cfg, "cpu").plan is None  # CPU defaults


@pytest.mark.parametrize(("values", "message"), [
    ({"gpus_per_worker": 2}, "a worker computes on one GPU"),
    ({"max_gpu_memory": 0}, "max_gpu_memory must be > 0"),
])
def test_gpu_options_are_checked(values, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig(shards="x/*.tar", out="o", **values).resolved()


def test_compiled_forward_pads_to_one_shape_and_never_recompiles(tmp_path):
    make_shards(tmp_path / "shards", 7, 7)
    base = {"shards": str(tmp_path / "shards" / "*.tar"), "model": "tiny_cnn", "methods": ["scorecam"],
            "metrics": ["ad", "ai"], "batch_size": 4, "images_per_batch": 3}
    eager = ShardEvaluator(EvalConfig(**base, out=str(tmp_path / "eager"), compile=False).resolved())
    eager.evaluate(str(tmp_path / "shards" / "t-000000.tar"), str(tmp_path / "eager"))
    before = compiled_graphs()
    compiled = ShardEvaluator(EvalConfig(**base, out=str(tmp_path / "compiled"), compile=True).resolved())
    assert compiled.compile and compiled.warmup_seconds > 0
    after_warmup = compiled_graphs()
    assert after_warmup - before <= 1  # one graph (fp32 methods and metrics); nothing else in start-up compiles
    result = compiled.evaluate(str(tmp_path / "shards" / "t-000000.tar"), str(tmp_path / "compiled"))
    assert result["compiled_graphs"] == after_warmup  # 7 images in calls of 3, 3, 1: no new graph
    a = read_metrics(tmp_path / "eager").to_pandas().sort_values(["key", "method"]).reset_index(drop=True)
    b = read_metrics(tmp_path / "compiled").to_pandas().sort_values(["key", "method"]).reset_index(drop=True)
    assert (a["key"] == b["key"]).all()
    assert (a["y"] - b["y"]).abs().max() < 1e-5 and (a["o"] - b["o"]).abs().max() < 1e-5


def test_prefetch_runs_ahead_keeps_order_and_raises_in_place():
    produced: list[int] = []

    def slow_source():
        for i in range(6):
            produced.append(i)
            yield i

    got = []
    for item in prefetched(slow_source(), depth=2):
        time.sleep(0.05)  # the consumer is slow: the producer stays ahead
        got.append((item, len(produced)))
    assert [g for g, _ in got] == list(range(6))
    assert got[0][1] >= 2  # by the time item 0 was consumed, later items were already produced

    def broken():
        yield 1
        raise OSError("storage went away")

    items = prefetched(broken())
    assert next(items) == 1
    with pytest.raises(OSError, match="storage went away"):
        next(items)
    threads = [t for t in threading.enumerate() if t.name == "unioncam-prefetch"]
    for t in threads:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in threads)


def test_metrics_run_across_methods_and_a_failing_map_costs_only_its_row(tmp_path, monkeypatch):
    make_shards(tmp_path / "shards", 4, 4)
    cfg = EvalConfig(shards=str(tmp_path / "shards" / "*.tar"), out=str(tmp_path / "run"), model="tiny_cnn",
                     methods=["gradcam", "layercam"], metrics=["ad", "ai", "insdel"], insdel_steps=4,
                     images_per_batch=4).resolved()
    ev = ShardEvaluator(cfg)
    calls = []
    import unioncam.evaluation.drop_increase as module  # what the AD/AI metric calls

    real = module.confidence

    def spy(model, images, maps, targets, batch_size, precision, protocol):
        calls.append(images.shape[0])
        if bool((maps[:, 0, 0] == 0.123).any()):
            raise ValueError("simulated metric failure")
        return real(model, images, maps, targets, batch_size, precision, protocol)

    monkeypatch.setattr(module, "confidence", spy)
    original = ev._explain

    def marked(cam, x, targets, keys):
        out = original(cam, x, targets, keys)
        if cam is ev.cams["layercam"] and x.shape[0] == 4:
            saliency, details, seconds = out[2]
            saliency = saliency.clone()
            saliency[0, 0] = 0.123
            out[2] = (saliency, details, seconds)
        return out

    monkeypatch.setattr(ev, "_explain", marked)
    ev.evaluate(str(tmp_path / "shards" / "t-000000.tar"), cfg.out)
    assert calls[0] == 8  # 4 images × 2 methods in one metric call
    rows = read_metrics(cfg.out).to_pandas()
    bad = rows[rows["error"].notna()]
    assert len(bad) == 1 and bad["method"].iloc[0] == "layercam" and "simulated metric failure" in bad["error"].iloc[0]
    assert rows[rows["error"].isna()][["y", "o", "insertion_auc"]].notna().all().all() and len(rows) == 8


def test_metric_forwards_at_reduced_precision_keep_fp32_logits():
    import warnings

    from unioncam.evaluation import confidence, insertion_deletion

    lm = load("tiny_cnn")
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1, 2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fp16 on CPU warns that it is slow
        y16, o16 = confidence(lm.model, x, maps, t, precision="fp16")
        ins16, del16 = insertion_deletion(lm.model, x, maps, t, steps=4, precision="fp16")
    y, o = confidence(lm.model, x, maps, t)
    ins, dele = insertion_deletion(lm.model, x, maps, t, steps=4)
    assert y16.dtype == torch.float32  # logits (and so probabilities) stay fp32
    assert not torch.equal(y16, y) and (y16 - y).abs().max() < 5e-3 and (o16 - o).abs().max() < 5e-3
    assert (ins16 - ins).abs().max() < 5e-3 and (del16 - dele).abs().max() < 5e-3
