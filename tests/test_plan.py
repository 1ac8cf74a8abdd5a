"""The planner and the sweep: well-formed plans, honest memory answers, real sweeps."""

from __future__ import annotations

import json

import pytest
from conftest import assert_clean_failure, run_cli

import mlx_tinylm  # noqa: F401
from mlx_tinylm import plan as planner
from mlx_tinylm.config import PRESETS, ModelConfig

LAW = planner.LossLaw(E=0.8, A=60.0, alpha=0.35, B=40.0, beta=0.3, source={"test": True})


def test_plan_on_a_tiny_grid_is_well_formed_and_picks_the_best_prediction():
    grid = planner.candidate_grid(512, widths=(32, 64), depths=(1, 2), contexts=(32,),
                                  batches=(8,))
    plan = planner.make_plan(0.5, engine="mlx", vocab_size=512, grid=grid,
                             seconds_per_shape=0.2, law=LAW)
    assert len(plan["candidates"]) == 4
    for row in plan["candidates"]:
        assert row["tok_s"] > 0 and row["tokens"] > 0 and row["fits"]
        assert row["predicted_bpb"] == pytest.approx(
            LAW.predict(row["params"], row["tokens"]), abs=1e-3)
    assert plan["pick"]["predicted_bpb"] == min(r["predicted_bpb"] for r in plan["candidates"])
    assert plan["command"].startswith("tinylm train --minutes 0.5 --d-model ")


@pytest.mark.parametrize("engine", ["mlx", "numpy"])
def test_memory_estimate_grows_with_model_size(engine):
    sizes = sorted(PRESETS.values(), key=lambda c: c.n_params)
    mems = [c.training_memory_bytes(32, engine=engine) for c in sizes]
    assert mems == sorted(mems) and len(set(mems)) == len(mems)
    base = ModelConfig()
    assert base.training_memory_bytes(64, engine=engine) > base.training_memory_bytes(32,
                                                                                      engine=engine)
    assert base.training_memory_bytes(32, context=512, engine=engine) > base.training_memory_bytes(
        32, engine=engine)


def test_memory_estimate_before_the_engine_is_chosen_is_the_larger_one():
    small, big = PRESETS["nano"], PRESETS["base"]
    for cfg in (small, big):
        both = [cfg.training_memory_bytes(16, engine=e) for e in ("mlx", "numpy")]
        assert cfg.training_memory_bytes(16, engine="auto") == max(both)
    # the NumPy engine's head works in row chunks: far less than MLX's full logits at a large batch
    assert small.training_memory_bytes(64, engine="numpy") < small.training_memory_bytes(64)


def test_impossible_size_is_answered_does_not_fit_with_numbers():
    result = run_cli("plan", "--params", "10B", "--tokens", "200M", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["memory"]["fits"] is False
    assert answer["memory"]["estimate_bytes"] > answer["memory"]["available_bytes"]
    assert answer["time"] is None
    assert answer["tokens_per_param"] == pytest.approx(200e6 / answer["params"])
    text = run_cli("plan", "--params", "10B", "--tokens", "200M")
    assert "does not fit" in text.stdout and "GiB" in text.stdout


def test_loss_law_fit_recovers_known_constants():
    points = [(n, d, LAW.predict(n, d)) for n in (1e5, 5e5, 2e6, 1e7) for d in (1e6, 1e7, 1e8)]
    fitted = planner.fit_loss_law(points, {"test": True})
    for n, d, y in points:
        assert fitted.predict(n, d) == pytest.approx(y, abs=0.01)


def test_shipped_loss_law_loads_and_says_where_it_came_from():
    law = planner.LossLaw.load()
    assert law.source.get("device") and law.source.get("date")
    assert 0 < law.predict(1e6, 1e6) < 10


def test_counts_parse_like_people_write_them():
    assert planner.parse_count("10M") == 1e7
    assert planner.parse_count("200k") == 2e5
    assert planner.parse_count("5e6") == 5e6
    with pytest.raises(planner.TinyLMError):
        planner.parse_count("lots")


def test_sweep_trains_two_sizes_end_to_end(prepared, tmp_path):
    result = planner.run_sweep(None, ["nano", "micro"], prepared, tmp_path / "sweep",
                               tokens=16384, engine="mlx")
    assert [r["preset"] for r in result["rows"]] == ["nano", "micro"]
    for row in result["rows"]:
        assert row["tokens"] >= 16384 and row["val_bpb"] > 0
    assert (tmp_path / "sweep" / "sweep.png").is_file()
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["best"]


def test_sweep_fit_joins_the_runs_of_an_earlier_sweep(prepared, tmp_path):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    rows = [{"preset": p, "params": n, "tokens": d, "val_bpb": b}
            for p, n, d, b in (("a", 2e5, 1e5, 2.6), ("b", 4e5, 5e4, 2.7), ("c", 8e5, 2.5e4, 2.9))]
    (earlier / "sweep.json").write_text(json.dumps({"rows": rows}))
    law_file = tmp_path / "law.json"
    result = planner.run_sweep(None, ["nano", "micro"], prepared, tmp_path / "sweep",
                               tokens=8192, engine="mlx", fit=True, fit_with=[earlier],
                               law_file=law_file)
    saved = planner.LossLaw.load(law_file)
    assert len(saved.source["points"]) == 5  # two new runs + three earlier ones
    assert saved.source["also_fitted"] == [str(earlier)]
    assert result["law"]["A"] == saved.A


def test_sweep_refuses_a_folder_that_holds_no_sweep_before_training(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("sweep", "--tokens", "1000", "--fit", "--fit-with", str(tmp_path / "empty"),
                   "--files", str(tmp_path / "none.txt"))
    assert_clean_failure(proc, "not a sweep result")


def test_cached_throughput_is_used_only_for_the_grid_it_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLM_HOME", str(tmp_path))
    grid = planner.candidate_grid(4096)
    measured = {"engine": "numpy", "device": "CPU", "memory_available": 0, "vocab_size": 4096,
                "date": "2026-01-01",
                "shapes": [{"config": c.to_dict(), "batch_size": b, "tok_s": 1000.0 + i,
                            "memory_bytes": 1, "fits": True} for i, (c, b) in enumerate(grid)]}
    assert planner.measures_current_grid(measured, 4096)
    planner.save_measurements(measured, "numpy")
    plan = planner.cached_plan(1.0, engine="numpy")  # no measuring: the cache is current
    assert sorted(r["tok_s"] for r in plan["candidates"]) == [1000.0 + i for i in range(len(grid))]
    # the same cache after the default recipe or batch changed is not current any more
    stale = {**measured, "shapes": [{**s, "config": {**s["config"], "mlp": "swiglu"}}
                                    for s in measured["shapes"]]}
    assert not planner.measures_current_grid(stale, 4096)
    assert not planner.measures_current_grid({**measured, "shapes": measured["shapes"][:-1]}, 4096)
    assert not planner.measures_current_grid({"shapes": None}, 4096)
    assert not planner.measures_current_grid(None, 4096)


def test_sweep_with_an_unknown_preset_fails_before_creating_its_folder(prepared, tmp_path):
    with pytest.raises(planner.TinyLMError, match="unknown preset"):
        planner.run_sweep(None, ["nano", "gigantic"], prepared, tmp_path / "sweep", tokens=100)
    assert not (tmp_path / "sweep").exists()
