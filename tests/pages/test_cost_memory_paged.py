"""The Cache-vs-recompute, Memory and Paged pages through app.py (AppTest), on a tiny saved model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from streamlit.testing.v1 import AppTest

import kvviz
from kvviz.economics.memory import CONFIGS_DIR
from kvviz.geometry import human_count

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
    assert m["Weights (8.03B params, float16)"] == "15.0 GiB"
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

    # issue 15's page fixes on a small loaded model: human units, tokens and chart from its own context
    at.segmented_control(key="mem_source").set_value("loaded model").run()
    m = metrics(at)
    params = sum(p.numel() for p in kvviz.load_model(str(tiny_checkpoint)).model.parameters())
    assert f"Weights ({human_count(params)} params, float16)" in m and "0.00 B" not in "".join(m)
    assert "One sequence (128 tokens)" in m  # the tiny model's context, not the preset's 8,192
    chart = charts(at)[0]
    assert max(max(t["x"]) for t in chart["data"]) == 128
    assert chart["layout"]["yaxis"]["title"]["text"].startswith("KiB")  # not a flat line at 0.00 GiB
    at.segmented_control(key="mem_extent").set_value("until the device is full").run()
    assert max(max(t["x"]) for t in charts(at)[0]["data"]) > 10**6  # asked for more: up to the device

    # the architectures: MLA, windows, hybrids, quantized scales
    at.segmented_control(key="mem_source").set_value("preset").run()
    at.selectbox(key="mem_preset").set_value("deepseek-v3").run()
    assert errors(at) == [] and metrics(at)["Per token"] == "68.6 KiB"  # 70,272 B in fp16 / bf16
    assert "Decompressed K/V per token" in metrics(at)
    at.selectbox(key="mem_preset").set_value("gemma-3-12b").run()
    m = metrics(at)
    assert m["Past the window, per token"] == "64.0 KiB" and "If the window were ignored" in m
    assert any("this model, windows ignored" in t.get("name", "") for t in charts(at)[0]["data"])
    at.selectbox(key="mem_dtype").set_value("int4").run()
    at.number_input(key="mem_group").set_value(32).run()
    assert errors(at) == [] and "Scales per token" in metrics(at)
    at.selectbox(key="mem_dtype").set_value("float16").run()
    at.selectbox(key="mem_preset").set_value("jamba-v0.1").run()
    assert "Fixed state, whole batch" in metrics(at)

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


def test_paged_page_poses_an_incident_and_compares_before_and_after(tiny_checkpoint):
    from kvviz.economics.paged import SCENARIOS

    at = open_page(tiny_checkpoint, "paged.py")
    at.run(timeout=180)
    assert errors(at) == []
    key = at.selectbox(key="paged_scenario").value
    sc = SCENARIOS[key]
    assert any(sc.question in i.value for i in at.info)
    results = at.session_state["paged_results"]
    assert set(results) == {"before", "after"}
    assert results["before"].server == results["after"].server == sc.before  # after starts at the incident
    assert results["before"].bytes_per_token == 131_072  # Llama-3-8B fp16, the default preset
    assert {m.label for m in at.metric} == set(sc.watch)
    figs = charts(at)
    assert len(figs) == 4  # over time, TTFT, where memory goes, the block table
    assert len(figs[3]["frames"]) >= 10 and figs[3]["layout"]["sliders"][0]["steps"]
    assert [t["type"] for t in figs[3]["data"]] == ["heatmap"] * 2
    assert "simulated time" in figs[0]["layout"]["xaxis3"]["title"]["text"]

    next(b for b in at.button if b.label == "Show a fix").click().run(timeout=180)
    assert errors(at) == []
    after = at.session_state["paged_results"]["after"]
    assert after.server == sc.fix and at.session_state["paged_results"]["before"].server == sc.before
    assert any(sc.why in s.value for s in at.success)  # the explanation, once the fix is shown
    watched = {m.label: m for m in at.metric}
    first = sc.watch[0]
    assert "before:" in watched[first].help

    at.selectbox(key="paged_scenario").set_value("mixed_prompts").run(timeout=180)
    assert errors(at) == []
    assert at.session_state["paged_results"]["before"].server == SCENARIOS["mixed_prompts"].before
    assert any("animation draws memories of up to 512 blocks" in i.value for i in at.info)  # 60,000 tokens / 16
    assert len(charts(at)) == 3

    at.selectbox(key="paged_scenario").set_value("fragmentation").run(timeout=180)
    at.number_input(key="paged_fragmentation_budget").set_value(16).run(timeout=180)
    at.selectbox(key="paged_fragmentation_block").set_value(256).run(timeout=180)  # 16 tokens < one block
    assert any("smaller than one block" in e for e in errors(at))


def test_a_scenario_link_opens_that_incident_once(tiny_checkpoint):
    """kit.paged_link(scenario) (the quiz's answers link there) opens the page on that incident; the picker stays free."""
    at = AppTest.from_file(str(ROOT / "pages" / "paged.py"), default_timeout=120)
    at.session_state["model_name"] = str(tiny_checkpoint)
    at.query_params["scenario"] = "long_generations"
    at.run()
    assert not at.exception and at.selectbox(key="paged_scenario").value == "long_generations"
    at.selectbox(key="paged_scenario").set_value("fragmentation").run()
    assert at.selectbox(key="paged_scenario").value == "fragmentation"  # the link does not pull it back
