"""Bad input and faults get one clear message; the app keeps what it had and the CLI exits calmly.

One test per case of issue 7, each checked where a user meets it: the API (the exception and its
message), the app (AppTest: a message, and the page still works with the previous model/run) and
the command line (non-zero exit, one line on stderr, no traceback).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from streamlit.testing.v1 import AppTest

import kvviz
from kvviz import cli
from kvviz.engine import models
from kvviz.engine.session import Limits, RunAborted
from kvviz.geometry import human_bytes
from kvviz.testing import run_cli
from kvviz.variants.bugs import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
STEP_PAGE = str(ROOT / "pages" / "step_through.py")
PROMPT = "It is a truth universally acknowledged, that"
HUB_ID = "kvviz-tests/no-such-model-7f3a"  # a hub id that does not exist, online or off


# -- helpers ----------------------------------------------------------------------------------------------
def run_main(capsys, *args: str) -> tuple[int, str]:
    """`python -m kvviz ARGS` in-process: (exit code, stderr)."""
    capsys.readouterr()  # drop what earlier parts of the test printed (e.g. the app's model loading)
    code = cli.main(list(args))
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert code != 0
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("kvviz: error:") and needle in lines[0], lines[0]




def step_page(model_dir: Path, prompt: str = PROMPT) -> AppTest:
    """The Step-through page on `model_dir`, prefill done."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["model_name"] = str(model_dir)
    at.run()
    at.switch_page(STEP_PAGE).run()
    at.text_area(key="step_prompt").input(prompt).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    return at


def errors(at: AppTest) -> list[str]:
    assert not at.exception, at.exception  # a message, never a crash
    return [e.value for e in at.error]


def still_steps(at: AppTest) -> None:
    """The page still works: one more click records one more step of the run on screen."""
    n = len(at.session_state["step_session"].steps)
    at.button(key="step_next").click().run()
    assert not at.exception
    assert len(at.session_state["step_session"].steps) == n + 1


def home_page(model_dir: Path) -> AppTest:
    """The app's first page (through app.py, so with the shared model sidebar) on `model_dir`."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["model_name"] = str(model_dir)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    return at


def generate(at: AppTest) -> None:
    next(b for b in at.button if b.label == "Generate").click().run()


def still_generates(at: AppTest, model_dir: Path) -> None:
    """After a failed load the previous model still answers: Home's quick run works on it."""
    generate(at)
    assert not at.exception
    assert at.dataframe, "the quick run produced no table"
    assert at.session_state["model_name"] == str(model_dir)


def load_in_sidebar(at: AppTest, name: str) -> str:
    """Type a model name into the sidebar; return the error shown there."""
    at.text_input(key="model_custom").input(name).run()
    shown = errors(at)
    assert shown, f"no error shown for {name!r}"
    assert at.session_state["model_name"] != name  # the working model stays selected
    assert "Still using" in shown[0]
    return shown[0]


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints that are not causal LMs: a BERT encoder and a T5 encoder-decoder (configs only)."""
    from transformers import BertConfig, T5Config

    out = {}
    for name, config in (
        ("bert", BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)),
        ("t5", T5Config(vocab_size=128, d_model=32, num_layers=1, num_heads=2, d_ff=64)),
    ):
        path = tmp_path_factory.mktemp(name)
        config.save_pretrained(path)
        out[name] = path
    return out


# -- empty prompt ---------------------------------------------------------------------------------------------
def test_empty_prompt(tiny_checkpoint, tiny_llama, capsys):
    with pytest.raises(kvviz.InputError, match="prompt is empty"):
        kvviz.Session(tiny_llama, " \n ", 4)

    at = step_page(tiny_checkpoint)
    at.text_area(key="step_prompt").input("").run()
    assert any("prompt is empty" in e for e in errors(at))
    assert at.session_state["step_session"].prompt == PROMPT  # the previous run is kept...
    still_steps(at)  # ...and still steps

    assert_one_line_error(*run_main(capsys, "trace", "--model", str(tiny_checkpoint), "--prompt", ""), "prompt is empty")


# -- prompt beyond the context -------------------------------------------------------------------------------
def test_prompt_beyond_the_models_context(tiny_checkpoint, tiny_llama, capsys):
    long_prompt = "word " * 300  # the tiny models have a context of 128 tokens
    with pytest.raises(kvviz.InputError, match=r"the limit is 127 \(model context 128"):
        kvviz.Session(tiny_llama, long_prompt, 4)

    at = step_page(tiny_checkpoint)
    at.text_area(key="step_prompt").input(long_prompt).run()
    assert any("model context 128" in e and "shorten it" in e for e in errors(at))
    assert at.session_state["step_session"].prompt == PROMPT
    still_steps(at)

    code, err = run_main(capsys, "trace", "--model", str(tiny_checkpoint), "--prompt", long_prompt)
    assert_one_line_error(code, err, "model context 128")


# -- steps beyond the limit ----------------------------------------------------------------------------------------
def test_steps_beyond_the_limit(tiny_checkpoint, tiny_llama, capsys, monkeypatch):
    with pytest.raises(kvviz.InputError, match="steps must be at most 256"):
        kvviz.Session(tiny_llama, PROMPT, 257)
    with pytest.raises(kvviz.InputError, match="exceed the model's context of 128"):
        kvviz.Session(tiny_llama, PROMPT, 200, limits=Limits(max_new_tokens=1000))

    # a deployment's cap (KVVIZ_MAX_NEW_TOKENS) is read when a run starts
    monkeypatch.setenv("KVVIZ_MAX_NEW_TOKENS", "4")
    with pytest.raises(kvviz.InputError, match="steps must be at most 4"):
        kvviz.Session(tiny_llama, PROMPT, 5)
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["model_name"] = str(tiny_checkpoint)
    at.run()  # Home: its slider offers up to 48 new tokens
    at.slider[0].set_value(12)
    at.button[0].click().run()  # Generate
    assert any("steps must be at most 4" in e for e in errors(at))
    at.slider[0].set_value(3)
    at.button[0].click().run()
    assert not errors(at) and at.dataframe, "a run within the cap works after the refusal"
    monkeypatch.setenv("KVVIZ_MAX_NEW_TOKENS", "30")
    at.switch_page(STEP_PAGE).run()
    assert at.number_input(key="step_new_tokens").max == 30  # the page offers no more than the cap
    monkeypatch.delenv("KVVIZ_MAX_NEW_TOKENS")

    # the model's context: a 100-token prompt leaves 28 positions of 128, the page asks for 24 + more
    at = step_page(tiny_checkpoint)
    at.number_input(key="step_new_tokens").set_value(60).run()
    at.text_area(key="step_prompt").input(" a" * 100).run()  # 100 tokens
    assert any("exceed the model's context of 128" in e for e in errors(at))
    still_steps(at)

    code, err = run_main(capsys, "trace", "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--steps", "300")
    assert_one_line_error(code, err, "steps must be at most 256")


@pytest.mark.parametrize("page,key", [("step_through.py", "step_new_tokens"), ("bug_lab.py", "lab_steps")])
def test_pages_respect_a_small_new_token_cap(tiny_checkpoint, monkeypatch, page, key):
    """A deployment may cap new tokens below a page's default: the page offers the cap, never crashes."""
    monkeypatch.setenv("KVVIZ_MAX_NEW_TOKENS", "4")
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["model_name"] = str(tiny_checkpoint)
    at.run()
    at.switch_page(str(ROOT / "pages" / page)).run()
    assert not at.exception, at.exception
    assert at.number_input(key=key).max == 4


PAGE_FILES = sorted(path.name for path in (ROOT / "pages").glob("*.py"))


@pytest.mark.parametrize("page", PAGE_FILES)
def test_every_page_answers_a_first_model_that_cannot_load_with_a_message(page):
    """KVVIZ_DEFAULT_MODEL (or a stale session) may name a model that does not load: no page may crash."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["model_name"] = "/no/such/checkpoint"
    at.run()
    if page != "home.py":
        at.switch_page(str(ROOT / "pages" / page)).run()
    assert not at.exception, at.exception
    assert any("no model directory" in e for e in errors(at))  # at least the sidebar says why


# -- unknown model --------------------------------------------------------------------------------------------
def test_unknown_model(tiny_checkpoint, tmp_path, capsys):
    missing = str(tmp_path / "no-such-checkpoint")
    with pytest.raises(kvviz.ModelLoadError, match="no model directory"):
        kvviz.load_model(missing)
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(kvviz.ModelLoadError, match="not a model directory"):
        kvviz.load_model(str(empty))

    at = home_page(tiny_checkpoint)
    assert "no model directory" in load_in_sidebar(at, missing)
    still_generates(at, tiny_checkpoint)  # a failed load leaves the previous model working
    at.switch_page(STEP_PAGE).run()
    still_steps(at)

    assert_one_line_error(*run_main(capsys, "trace", "--model", missing, "--prompt", PROMPT), "no model directory")


# -- hub id while offline ---------------------------------------------------------------------------------------
def test_hub_id_while_offline_fails_fast(tiny_checkpoint, capsys, monkeypatch):
    """Guards the ~25 s of retries transformers spends on a dead network: kvviz checks first."""
    for offline in ("1", ""):  # told it is offline, and left to find out (no network here; a 404 when online)
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        t0 = time.perf_counter()
        with pytest.raises(kvviz.ModelLoadError, match="offline, or no such model"):
            kvviz.load_model(HUB_ID)
        assert time.perf_counter() - t0 < 15

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at = home_page(tiny_checkpoint)
    assert "offline, or no such model" in load_in_sidebar(at, HUB_ID)
    still_generates(at, tiny_checkpoint)

    out = run_cli("trace", "--model", HUB_ID, "--prompt", PROMPT)
    assert_one_line_error(out.returncode, out.stderr, "offline, or no such model")


# -- not a causal LM ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,needle", [("bert", "bidirectional encoder"), ("t5", "encoder-decoder")])
def test_model_that_is_not_a_causal_lm(tiny_checkpoint, encoder_dirs, capsys, kind, needle):
    path = str(encoder_dirs[kind])
    with pytest.raises(kvviz.ModelLoadError, match=needle):
        kvviz.load_model(path)

    at = home_page(tiny_checkpoint)
    assert needle in load_in_sidebar(at, path)
    still_generates(at, tiny_checkpoint)

    assert_one_line_error(*run_main(capsys, "trace", "--model", path, "--prompt", PROMPT), needle)


# -- too large for the memory ---------------------------------------------------------------------------------
def test_model_too_large_is_refused_before_loading_with_the_estimate(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    config = models.load_config(str(tiny_checkpoint))
    need = models.estimate_weight_bytes(config, torch.float32)
    n_params = sum(p.numel() for p in kvviz.load_model(str(tiny_checkpoint)).model.parameters())
    assert need == 4 * n_params  # the estimate counts the real parameters, float32

    with pytest.raises(kvviz.ModelLoadError) as err:
        models.check_fits("big", config, torch.float32, torch.device("cpu"), available=need)  # 70% rule: too little
    estimate = human_bytes(need)
    assert f"needs about {estimate}" in str(err.value) and "pick a smaller model" in str(err.value)
    assert models.check_fits("ok", config, torch.float32, torch.device("cpu"), available=2 * need) == need

    # load_model asks before loading anything: the weights are never read
    other = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, other)

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights were loaded although the model cannot fit")

    with monkeypatch.context() as m:
        m.setattr(models, "available_bytes", lambda device: 1000)
        m.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
        with pytest.raises(kvviz.ModelLoadError, match=f"needs about {estimate}"):
            kvviz.load_model(str(other))

    at = home_page(tiny_checkpoint)  # the app's own model loads normally...
    monkeypatch.setattr(models, "available_bytes", lambda device: 1000)
    assert f"needs about {estimate}" in load_in_sidebar(at, str(other))
    still_generates(at, tiny_checkpoint)

    code, err = run_main(capsys, "trace", "--model", str(other), "--prompt", PROMPT)
    assert_one_line_error(code, err, f"needs about {estimate}")


# -- unknown bug name -------------------------------------------------------------------------------------------
def test_unknown_bug_name(tiny_checkpoint, tiny_llama):
    """The app offers bugs only from the registry (a select box); API and CLI name the valid ones."""
    with pytest.raises(ValueError, match="unknown bug 'nope'; choose one of: none, ") as err:
        kvviz.Session(tiny_llama, PROMPT, 3, bug="nope")
    for name in REGISTRY:
        assert name in str(err.value)

    out = run_cli("trace", "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--bug", "nope")
    assert_one_line_error(out.returncode, out.stderr, "unknown bug 'nope'")


# -- out of memory during a step ----------------------------------------------------------------------------------
def _fail_decode_steps(model: Any, monkeypatch, error: BaseException) -> None:
    """Make the model's cached decode forwards (one new token) raise `error`; prefill still works."""
    real = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] == 1:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"),
], ids=["torch", "python", "cpu-allocator"])
def test_out_of_memory_in_a_step_ends_that_run_not_the_model(tiny_llama, monkeypatch, error):
    sess = kvviz.Session(tiny_llama, PROMPT, 8, parity=False)
    sess.step()
    with monkeypatch.context() as m:
        _fail_decode_steps(tiny_llama.model, m, error)
        with pytest.raises(RunAborted, match="ran out of memory at step 1"):
            sess.step()
    assert sess.done and "out of memory" in sess.stopped_reason
    assert len(sess.trace().steps) == 1  # what was recorded is kept
    with pytest.raises(kvviz.InputError, match="generation is over"):
        sess.step()
    assert len(kvviz.trace(tiny_llama, PROMPT, 3).steps) == 3  # the shared model is fine


def test_other_errors_in_a_step_are_not_taken_for_out_of_memory(tiny_llama, monkeypatch):
    sess = kvviz.Session(tiny_llama, PROMPT, 4, parity=False)
    sess.step()
    with monkeypatch.context() as m:
        _fail_decode_steps(tiny_llama.model, m, RuntimeError("shape mismatch"))
        with pytest.raises(RuntimeError, match="shape mismatch"):
            sess.step()


def test_out_of_memory_in_the_app_shows_a_message_and_keeps_the_run(tiny_checkpoint, monkeypatch):
    at = step_page(tiny_checkpoint)
    still_steps(at)
    model = at.session_state["step_session"].lm.model  # the one model every session shares
    with monkeypatch.context() as m:
        _fail_decode_steps(model, m, torch.OutOfMemoryError("CUDA out of memory"))
        at.button(key="step_next").click().run()
    assert any("ran out of memory at step 2" in e for e in errors(at))
    session = at.session_state["step_session"]
    assert session.done and len(session.steps) == 2  # prefill + the step before the fault, still on screen
    assert at.button(key="step_next").disabled
    at.button(key="step_reset").click().run()  # the user starts again: the app is fine
    assert not errors(at)
    still_steps(at)


# -- limits ---------------------------------------------------------------------------------------------------
def test_limits_come_from_the_environment_in_one_place(monkeypatch):
    assert Limits() == Limits(max_prompt_tokens=512, max_new_tokens=256, max_trace_bytes=512 * 2**20)
    monkeypatch.setenv("KVVIZ_MAX_PROMPT_TOKENS", "64")
    monkeypatch.setenv("KVVIZ_MAX_NEW_TOKENS", "32")
    monkeypatch.setenv("KVVIZ_MAX_TRACE_MB", "8")
    assert Limits() == Limits(max_prompt_tokens=64, max_new_tokens=32, max_trace_bytes=8 * 2**20)
    monkeypatch.setenv("KVVIZ_MAX_TRACE_MB", "lots")
    with pytest.raises(ValueError, match="KVVIZ_MAX_TRACE_MB='lots' must be a whole number"):
        Limits()
    monkeypatch.setenv("KVVIZ_MAX_TRACE_MB", "0")
    with pytest.raises(ValueError, match="KVVIZ_MAX_TRACE_MB must be at least 1"):
        Limits()


def test_prompt_cap_from_the_environment(tiny_llama, monkeypatch):
    monkeypatch.setenv("KVVIZ_MAX_PROMPT_TOKENS", "5")
    with pytest.raises(kvviz.InputError, match=r"the limit is 5 .*kvviz cap 5"):
        kvviz.Session(tiny_llama, PROMPT, 2)


def test_trace_memory_cap_stops_the_run_with_a_reason(tiny_llama):
    """A run stops once its recorded arrays pass the cap; it never grows past it by more than a step."""
    free = kvviz.Session(tiny_llama, PROMPT, 30, parity=False, stop_at_eos=False).run()
    cap = free.steps[0].nbytes() + sum(s.nbytes() for s in free.steps[1:6])  # room for prefill + 5 steps
    sess = kvviz.Session(tiny_llama, PROMPT, 30, parity=False, stop_at_eos=False, limits=Limits(max_trace_bytes=cap))
    t = sess.run()
    assert len(t.steps) == 7  # the step that crossed the cap is kept, then the run stops
    assert "cap" in sess.stopped_reason
    assert sess.trace_bytes() == t.nbytes() <= cap + t.steps[-1].nbytes()
