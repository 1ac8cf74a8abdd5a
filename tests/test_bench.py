"""`tinylm bench` end to end on a tiny preset: every figure present, the engines agree, and an
engine this machine cannot run (no torch) is reported as skipped rather than crashing."""

from __future__ import annotations

import json
import math

import pytest
from conftest import assert_clean_failure, run_cli

from mlx_tinylm import bench as B

# A tiny model for seconds-long runs; one thread per framework keeps torch's thread pool from
# stalling on a busy CI machine (the benchmark itself uses the frameworks' defaults).
TINY = ["--preset", "nano", "--batch-size", "2", "--context", "32", "--seconds", "0.3"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
ENGINE_FIELDS = ("train_tok_s", "forward_tok_s", "generate_tok_s", "peak_mem_mb",
                 "matmul_peak_gflops", "mfu", "first_loss", "vs_torch_eager", "device")


def test_bench_runs_every_engine_prints_the_table_and_saves_complete_json(tmp_path) -> None:
    out = tmp_path / "result.json"
    run = run_cli("bench", *TINY, "--engines", "mlx,numpy,torch-eager", "--out", str(out),
                  env=ONE_THREAD)
    assert run.returncode == 0, run.stderr
    for label in ("MLX", "PyTorch eager", "NumPy", "MFU", "× torch eager"):
        assert label in run.stdout, label
    result = json.loads(out.read_text())
    for key in ("date", "command", "machine", "versions", "config", "batch_size", "context",
                "flops_per_token", "agreement", "load_average"):
        assert key in result, key
    assert {"mlx", "numpy", "torch"} <= set(result["versions"])
    assert result["machine"]["cpu_count"] >= 1
    names = [e["name"] for e in result["engines"]]
    assert names == ["mlx-compiled", "mlx-uncompiled", "torch-eager", "numpy"]
    for e in result["engines"]:
        assert e["status"] == "ok", e
        for field in ENGINE_FIELDS:
            assert e[field] is not None, (e["name"], field)
        train = e["train_tok_s"]
        assert 0 < train["min"] <= train["median"] <= train["max"] and train["steps"] >= 3
        assert e["forward_tok_s"]["median"] > 0 and e["generate_tok_s"] > 0
        assert 0 < e["mfu"] < 5 and e["peak_mem_mb"] > 0
        assert math.isfinite(e["first_loss"])
        assert len(e["generated"]) == result["generation"]["new_tokens"]
    eager = result["engines"][names.index("torch-eager")]
    assert eager["vs_torch_eager"]["train"] == pytest.approx(1.0)
    agreement = result["agreement"]
    assert agreement["passed"] and agreement["compared"] == 4
    assert agreement["max_abs_diff"] <= 1e-3
    # the Markdown table for the README carries every engine
    md = B.to_markdown(result)
    table_lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + len(names)  # header, rule, one row per engine


def test_bench_reports_torch_as_skipped_when_torch_cannot_be_imported(tmp_path) -> None:
    # Every process started with this PYTHONPATH, the engine workers included, sees no torch.
    hide = tmp_path / "hide_torch"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    from conftest import ROOT

    run = run_cli("bench", *TINY, "--engines", "torch,numpy", "--json",
                  "--out", str(tmp_path / "r.json"),
                  env={**ONE_THREAD, "PYTHONPATH": f"{ROOT}:{hide}"})
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    result = json.loads(run.stdout)
    by_name = {e["name"]: e for e in result["engines"]}
    for name in ("torch-eager", "torch-compiled"):
        assert by_name[name]["status"] == "skipped"
        assert "torch" in by_name[name]["reason"]
    assert by_name["numpy"]["status"] == "ok"
    assert by_name["numpy"]["vs_torch_eager"] is None  # no baseline to compare with
    assert result["agreement"]["passed"]


def test_unknown_engine_is_a_one_line_error() -> None:
    assert_clean_failure(run_cli("bench", *TINY, "--engines", "mlx,jax"), "unknown engine")


def test_engine_groups_expand_in_a_stable_order() -> None:
    assert B.parse_engines("numpy,torch") == ["torch-eager", "torch-compiled", "numpy"]
    assert B.parse_engines("mlx-compiled, numpy") == ["mlx-compiled", "numpy"]
    with pytest.raises(B.BenchError):
        B.parse_engines(" , ")


def test_results_file_name_carries_date_and_machine() -> None:
    result = {"date": "2026-01-02T03:04:05",
              "machine": {"system": "Linux", "machine": "x86_64", "cpu": "AMD EPYC 9R14",
                          "cpu_count": 2}}
    path = B.default_output_path(result)
    assert path.name == "bench-2026-01-02-0304-linux-x86_64-amd-epyc-9r14-2cpu.json"


def test_fastest_engine_measures_once_then_remembers_the_choice(tmp_path, monkeypatch) -> None:
    from mlx_tinylm.config import preset

    monkeypatch.setenv("TINYLM_HOME", str(tmp_path))
    cfg = preset("nano").with_(context_length=32, vocab_size=256)
    choice = B.fastest_engine(cfg, batch=2, context=32)
    assert choice in ("mlx", "numpy")
    saved = json.loads((tmp_path / "engine-choice.json").read_text())
    (entry,) = saved.values()
    assert entry["engine"] == choice and set(entry["step_seconds"]) == {"mlx", "numpy"}
    # a remembered answer is returned as stored (here: edited to the other engine)
    other = "numpy" if choice == "mlx" else "mlx"
    (tmp_path / "engine-choice.json").write_text(json.dumps(
        {k: {**v, "engine": other} for k, v in saved.items()}))
    assert B.fastest_engine(cfg, batch=2, context=32) == other
    assert B.fastest_engine(cfg, batch=2, context=32, use_cache=False) in ("mlx", "numpy")


@pytest.mark.parametrize("option", [dict(position="learned"), dict(norm="layernorm"),
                                    dict(mlp="gelu"), dict(qk_norm=True)])
def test_auto_engine_is_mlx_for_an_architecture_the_fast_numpy_engine_lacks(
        option, tmp_path, monkeypatch) -> None:
    # 'numpy' would silently mean the reference engine, many times slower than MLX
    from mlx_tinylm.config import preset

    monkeypatch.setenv("TINYLM_HOME", str(tmp_path))
    cfg = preset("nano").with_(context_length=32, vocab_size=256, **option)
    assert B.fastest_engine(cfg, batch=2, context=32) == "mlx"
    assert not (tmp_path / "engine-choice.json").exists()  # answered without measuring
