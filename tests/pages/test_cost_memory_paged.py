"""The Cache-vs-recompute, Memory and Paged pages through app.py (AppTest), on a tiny saved model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from streamlit.testing.v1 import AppTest

import kvviz
from kvviz.economics.memory import CONFIGS_DIR

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "app.py")


def open_page(model_dir: Path, page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["model_name"] = str(model_dir)
    at.run()
    at.switch_page(str(ROOT / "pages" / page)).run()
    assert not at.exception, at.exception
    return at


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def errors(at: AppTest) -> list[str]:
    assert not at.exception, at.exception
    return [e.value for e in at.error]


def test_memory_page_presets_numbers_paths_and_the_measured_cache(tiny_checkpoint, tmp_path, monkeypatch):
    at = open_page(tiny_checkpoint, "memory.py")
    assert errors(at) == []
    m = metrics(at)
    assert m["Per token"] == "128.0 KiB" and m["One sequence (8,192 tokens)"] == "1.0 GiB"  # Llama-3-8B fp16
    assert m["Equal"] == "yes ✓" and m["Measured: K and V tensor bytes"] == m["Formula"]
    names = [t.get("name", "") for t in charts(at)[0]["data"]]
    assert any("MHA (32" in n for n in names) and any("GQA (8" in n and "this model" in n for n in names)
    assert any(n.startswith("weights") for n in names)

    at.segmented_control(key="mem_source").set_value("numbers").run()
    at.number_input(key="mem_kv").set_value(1).run()
    assert errors(at) == [] and metrics(at)["Per token"] == "16.0 KiB"  # 2 x 32 x 1 x 128 x 2
    at.number_input(key="mem_kv").set_value(5).run()  # 32 query heads are not a multiple of 5
    assert any("multiple" in e for e in errors(at))

    shutil.copy(CONFIGS_DIR / "gemma-7b.json", tmp_path / "config.json")
    at.segmented_control(key="mem_source").set_value("hub id or path").run()
    at.text_input(key="mem_target").input(str(tmp_path)).run()
    assert errors(at) == [] and metrics(at)["Per token"] == "448.0 KiB"  # head_dim 256, not 192

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at.text_input(key="mem_target").input("kvviz-tests/no-such-model-7f3a").run()
    assert any("offline" in e for e in errors(at))

    # a Step-through run in the same browser session: its live cache is weighed too
    run = kvviz.Session(kvviz.load_model(str(tiny_checkpoint)), "It is a truth", 3, parity=False, stop_at_eos=False)
    run.step()
    at.session_state["step_session"] = run
    at.segmented_control(key="mem_source").set_value("preset").run()
    live = next(m.value for m in at.markdown if "Step through" in m.value)
    assert f"**{run.cache.nbytes():,} B**" in live and "equal ✓" in live


def run_button(at: AppTest) -> None:
    next(b for b in at.button if "Run the measurements" in b.label).click().run()


def test_cost_page_measures_only_on_the_button(tiny_checkpoint):
    """Guards issue 17: a first visit started a timing run for every visitor; now nothing runs until asked."""
    at = open_page(tiny_checkpoint, "cost.py")
    assert errors(at) == [] and at.session_state["cost_sweep"] is None and not charts(at)
    assert any("nothing is timed until you ask" in i.value for i in at.info)
    run_button(at)
    assert errors(at) == []
    sweep = at.session_state["cost_sweep"]
    assert [s.context for s in sweep.steps] == [8, 16, 32, 64, 128]  # the tiny model's context is 128
    assert sweep.threads == 1
    figs = charts(at)
    assert len(figs) == 4
    times = figs[0]
    assert [t["name"].split(" (")[0] for t in times["data"]] == ["with the KV cache", "full recompute"]
    assert "ms per decode step" in times["layout"]["yaxis"]["title"]["text"]
    assert "Measured speed-up" in metrics(at) and metrics(at)["FLOP ratio"].endswith("×")

    at.multiselect(key="cost_contexts").set_value([8, 32])
    at.number_input(key="cost_repeats").set_value(2)
    run_button(at)
    new = at.session_state["cost_sweep"]
    assert errors(at) == [] and new is not sweep
    assert [s.context for s in new.steps] == [8, 32] and all(len(s.cached_ms.samples) == 2 for s in new.steps)

    at.multiselect(key="cost_contexts").set_value([])
    run_button(at)
    assert any("context lengths must be" in e for e in errors(at))
    assert at.session_state["cost_sweep"] is new  # the last good measurement is kept and shown
    assert len(charts(at)) == 4


def test_paged_page_simulates_animates_and_refuses_huge_budgets(tiny_checkpoint):
    at = open_page(tiny_checkpoint, "paged.py")
    assert errors(at) == []
    results = at.session_state["paged_results"]
    assert set(results) == {"contiguous", "paged", "prefix"}
    assert results["prefix"].bytes_per_token == 2 * 2 * 2 * 16 * 2  # tiny Llama: 2 layers, 2 KV heads, head_dim 16, fp16
    m = metrics(at)
    assert int(m["Paged + prefix sharing: fit at once"]) > int(m["Contiguous, reserved to max length: fit at once"])
    figs = charts(at)
    assert len(figs) == 3
    table = figs[2]
    assert len(table["frames"]) >= 10 and table["layout"]["sliders"][0]["steps"]
    assert [t["type"] for t in table["data"]] == ["heatmap"] * 3
    shared_cells = [sum("×" in cell for row in f["data"][2]["text"] for cell in row) for f in table["frames"]]
    assert max(shared_cells) >= 256 // 16  # the system prompt's 16 blocks, stored once and shared
    last = [cell for row in table["frames"][-1]["data"][2]["text"] for cell in row]
    assert shared_cells[-1] == 0 and last.count("c") >= 16  # all done: the prefix stays cached, unowned

    which = at.selectbox(key="paged_model").value
    budget = next(n for n in at.number_input if n.key.startswith("paged_budget_"))
    budget.set_value(budget.value * 1000)
    next(b for b in at.button if "Simulate" in b.label).click().run()
    assert any("at most 4,096" in e for e in errors(at))
    assert at.session_state["paged_results"] is results and which
