"""Many users on one process: concurrent sessions on one shared model never mix their data.

Two levels, both compared against the same sessions run one after another:
- the API: six `Session`s stepping in lock-step threads (different prompts, sampling, bugs, parity),
- the app: four `AppTest` browser sessions on the Step-through page, clicking "Next step" in
  threads, all served by the one model `st.cache_resource` shares.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from streamlit import config
from streamlit.runtime import Runtime
from streamlit.testing.v1 import AppTest, app_test

import kvviz
from kvviz.engine.sampling import Sampling
from kvviz.testing import run_in_lockstep, step_view_act, step_view_payload
from kvviz.variants.registry import names

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "app.py")
STEP_PAGE = str(ROOT / "pages" / "step_through.py")
ARRAYS = ("query_states", "key_states", "value_states", "scores", "weights", "kv_head_of",
          "attended_keys", "attended_values")


def assert_same_run(got: kvviz.Trace, ref: kvviz.Trace) -> None:
    """Everything a trace records, except wall-clock timings, is identical."""
    assert got.prompt_ids == ref.prompt_ids
    assert got.generated_ids == ref.generated_ids
    assert got.generated_text == ref.generated_text
    assert len(got.steps) == len(ref.steps)
    for s_got, s_ref in zip(got.steps, ref.steps):
        assert (s_got.input_ids, s_got.positions, s_got.cache_len) == (s_ref.input_ids, s_ref.positions, s_ref.cache_len)
        assert s_got.top_k == s_ref.top_k
        assert s_got.max_abs_logit_diff == s_ref.max_abs_logit_diff
        for l_got, l_ref in zip(s_got.layers, s_ref.layers):
            for name in ARRAYS:
                a, b = getattr(l_got, name), getattr(l_ref, name)
                assert (a is None) == (b is None), name
                if a is not None:
                    np.testing.assert_array_equal(a, b, err_msg=f"step {s_got.step} layer {l_got.layer_idx} {name}")


# -- the API ------------------------------------------------------------------------------------------
def api_configs() -> list[dict[str, Any]]:
    bugs = names("bug")[:2]  # two injected bugs: their per-session cache state must stay per session
    rows = [  # (prompt, sampling, bug, parity check)
        ("It is a truth universally acknowledged", Sampling(), None, True),
        ("The quick brown fox", Sampling(greedy=False, temperature=1.3, seed=1), None, False),
        ("Keys and values are stored", Sampling(greedy=False, top_p=0.8, seed=2), bugs[0], True),
        ("must be in want of a wife", Sampling(greedy=False, top_k=5, seed=3), bugs[1], False),
        ("The cache grows by one row", Sampling(greedy=False, temperature=0.7, seed=4), None, True),
        ("a single man in possession", Sampling(), None, False),
    ]
    return [dict(prompt=p, sampling=s, bug=b, parity=c) for p, s, b, c in rows]


def run_alone(lm: kvviz.LoadedModel, cfg: dict[str, Any], steps: int) -> kvviz.Trace:
    return kvviz.Session(lm, cfg["prompt"], steps, sampling=cfg["sampling"], bug=cfg["bug"], parity=cfg["parity"],
                         stop_at_eos=False).run()


def test_six_api_sessions_in_threads_equal_the_same_sessions_run_one_after_another(tiny_llama):
    """Per-user state (cache, recorder, RNG, bug state) stays per Session while all share one model."""
    steps = 7
    configs = api_configs()
    alone = [run_alone(tiny_llama, cfg, steps) for cfg in configs]
    results: dict[int, kvviz.Trace] = {}

    def work(i: int, sync: Callable[[], None]) -> None:
        cfg = configs[i]
        sess = kvviz.Session(tiny_llama, cfg["prompt"], steps, sampling=cfg["sampling"], bug=cfg["bug"],
                             parity=cfg["parity"], stop_at_eos=False)
        while not sess.done:
            sync()  # lock-step: every session is mid-forward at the same time
            sess.step()
        results[i] = sess.trace()

    run_in_lockstep([functools.partial(work, i) for i in range(len(configs))], timeout=60)
    for i, ref in enumerate(alone):
        assert_same_run(results[i], ref)


# -- the app ------------------------------------------------------------------------------------------
@pytest.fixture
def shared_runtime(monkeypatch):
    """One Runtime (and one set of options) for every AppTest, as a real server has.

    AppTest swaps a mock Runtime into a process-global slot for each run and clears it afterwards,
    so two AppTests running at once would clear each other's. A real `streamlit run` has exactly
    one Runtime for all its browser sessions; this keeps the last mock in place the same way.
    """
    last: list[Any] = [None]

    def instance(cls):
        if cls._instance is not None:
            last[0] = cls._instance
            return cls._instance
        if last[0] is None:
            raise RuntimeError("Runtime hasn't been created!")
        return last[0]

    monkeypatch.setattr(Runtime, "instance", classmethod(instance))
    monkeypatch.setattr(Runtime, "exists", classmethod(lambda cls: cls._instance is not None or last[0] is not None))
    # AppTest also turns the global option "global.appTest" on for each run and back off after it;
    # one run ending would switch it off under the others. Keep it on for the whole test.
    previous = config.get_option("global.appTest")
    config.set_option("global.appTest", True)
    monkeypatch.setattr(app_test, "patch_config_options", lambda options: nullcontext())
    yield
    config.set_option("global.appTest", previous)


@pytest.fixture
def compile_once(monkeypatch):
    """Compile each page script once, under a lock, as a server does.

    AppTest builds a fresh script cache for every run, so concurrent runs parse the same files
    at the same time, and CPython 3.11's parser is not safe for that ("SystemError: AST constructor
    recursion depth mismatch"). A server compiles a page once and shares the bytecode.
    """
    from streamlit.runtime.scriptrunner import script_cache

    lock = threading.Lock()
    compiled: dict[str, Any] = {}
    original = script_cache.ScriptCache.get_bytecode

    def get_bytecode(self, script_path: str) -> Any:
        with lock:
            if script_path not in compiled:
                compiled[script_path] = original(self, script_path)
            return compiled[script_path]

    monkeypatch.setattr(script_cache.ScriptCache, "get_bytecode", get_bytecode)


# (prompt, sampling widgets or None for greedy, clicks on "Next step")
APP_SESSIONS = [
    ("It is a truth universally acknowledged", None, 5),
    ("The quick brown fox", {"step_temperature": 1.2, "step_seed": 7}, 4),
    ("Keys and values are", {"step_temperature": 0.8, "step_seed": 3}, 6),
    ("must be in want of a wife", None, 3),
]


def open_step_page(model_dir: str, prompt: str, sampling: dict[str, Any] | None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["model_name"] = model_dir
    at.run()
    at.switch_page(STEP_PAGE).run()
    at.text_area(key="step_prompt").input(prompt).run()
    if sampling:
        at.segmented_control(key="step_mode").set_value("sample").run()
        at.slider(key="step_temperature").set_value(sampling["step_temperature"]).run()
        at.number_input(key="step_seed").set_value(sampling["step_seed"]).run()
    return at


def click_next(at: AppTest) -> None:
    step_view_act(at, do="next")  # what the step view's Next button sends


def shown(at: AppTest) -> dict[str, Any]:
    """What this browser session holds and shows."""
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    session: kvviz.Session = at.session_state["step_session"]
    return {
        "session": session,
        "trace": session.trace(),
        "shown_step": at.session_state["step_view"],
        "payload_steps": len(step_view_payload(at)["kv"]["ref"]),  # what the browser draws from
    }


def test_four_app_sessions_in_threads_equal_the_same_sessions_one_after_another(
    tiny_checkpoint, shared_runtime, compile_once
):
    """Four browser sessions stepping at once on one cached model: each sees only its own run."""
    model_dir = str(tiny_checkpoint)

    sequential = []
    for prompt, sampling, clicks in APP_SESSIONS:
        at = open_step_page(model_dir, prompt, sampling)
        for _ in range(clicks):
            click_next(at)
        sequential.append(shown(at))

    apps: dict[int, AppTest] = {}

    def work(i: int, sync: Callable[[], None]) -> None:
        prompt, sampling, clicks = APP_SESSIONS[i]
        apps[i] = open_step_page(model_dir, prompt, sampling)
        for k in range(max(c for _, _, c in APP_SESSIONS)):
            sync()  # every session clicks in the same round
            if k < clicks:
                click_next(apps[i])

    run_in_lockstep([functools.partial(work, i) for i in range(len(APP_SESSIONS))])

    concurrent = [shown(apps[i]) for i in range(len(APP_SESSIONS))]
    models = {id(c["session"].lm) for c in concurrent + sequential}
    assert len(models) == 1, "every browser session must share the one cached model"
    assert len({id(c["session"]) for c in concurrent}) == len(APP_SESSIONS)
    for (prompt, _sampling, clicks), seq, con in zip(APP_SESSIONS, sequential, concurrent):
        assert con["trace"].prompt == prompt
        assert len(con["trace"].steps) == 1 + clicks  # prefill + one step per click, none from the others
        assert_same_run(con["trace"], seq["trace"])
        assert (con["shown_step"], con["payload_steps"]) == (seq["shown_step"], seq["payload_steps"]) == (clicks, 1 + clicks)
