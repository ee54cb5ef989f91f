"""Bad input and faults get one clear message; the app keeps what it had and the CLI exits calmly.

One test per case of issue 7, each checked where a user meets it: the API (the exception and its
message), the app (AppTest: a message, and the page still works with the previous model/run) and
the command line (non-zero exit, one line on stderr, no traceback). Then one test (or a few) per
numbered case of issue 17, "a classroom server one visitor cannot break", marked `# -- 17.N`.
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
from kvviz.testing import run_cli, step_view_act, step_view_payload
from kvviz.ui.text import unescape
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
    """The page's error messages as the visitor reads them (user text in them is Markdown-escaped)."""
    assert not at.exception, at.exception  # a message, never a crash
    return [unescape(e.value) for e in at.error]


def still_steps(at: AppTest) -> None:
    """The page still works: one more click records one more step of the run on screen."""
    n = len(at.session_state["step_session"].steps)
    step_view_act(at, do="next")  # what the step view's Next button sends
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
    with pytest.raises(ValueError, match="unknown cache variant 'nope'; choose one of: none, ") as err:
        kvviz.Session(tiny_llama, PROMPT, 3, bug="nope")
    for name in REGISTRY:
        assert name in str(err.value)

    out = run_cli("trace", "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--bug", "nope")
    assert_one_line_error(out.returncode, out.stderr, "unknown cache variant 'nope'")


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
    """The step view is a component: its payload carries the message, the `done` flag that disables Next, the run."""
    at = step_page(tiny_checkpoint)
    still_steps(at)
    model = at.session_state["step_session"].lm.model  # the one model every session shares
    with monkeypatch.context() as m:
        _fail_decode_steps(model, m, torch.OutOfMemoryError("CUDA out of memory"))
        step_view_act(at, do="next")
    assert not at.exception
    view = step_view_payload(at)
    assert any(n["kind"] == "error" and "ran out of memory at step 2" in n["text"] for n in view["notices"])
    session = at.session_state["step_session"]
    assert session.done and len(session.steps) == 2  # prefill + the step before the fault, still on screen
    assert view["done"] and len(view["kv"]["ref"]) == 2  # the browser disables Next on `done`
    step_view_act(at, do="reset")  # the user starts again: the app is fine
    assert not errors(at) and not step_view_payload(at)["notices"]
    still_steps(at)


# -- limits ---------------------------------------------------------------------------------------------------
def test_limits_come_from_the_environment_in_one_place(monkeypatch):
    assert Limits() == Limits(max_prompt_tokens=512, max_new_tokens=256, max_trace_bytes=256 * 2**20)
    monkeypatch.setenv("KVVIZ_MAX_PROMPT_TOKENS", "64")
    monkeypatch.setenv("KVVIZ_MAX_NEW_TOKENS", "32")
    monkeypatch.setenv("KVVIZ_MAX_TRACE_MB", "8")
    assert Limits() == Limits(max_prompt_tokens=64, max_new_tokens=32, max_trace_bytes=8 * 2**20)
    monkeypatch.setenv("KVVIZ_MAX_TRACE_MB", "lots")
    with pytest.raises(kvviz.InputError, match="KVVIZ_MAX_TRACE_MB='lots' must be a whole number"):
        Limits()
    monkeypatch.setenv("KVVIZ_MAX_TRACE_MB", "0")
    with pytest.raises(kvviz.InputError, match="KVVIZ_MAX_TRACE_MB must be between 1 and"):
        Limits()


def test_prompt_cap_from_the_environment(tiny_llama, monkeypatch):
    monkeypatch.setenv("KVVIZ_MAX_PROMPT_TOKENS", "5")
    with pytest.raises(kvviz.InputError, match=r"the limit is 5 .*kvviz cap 5"):
        kvviz.Session(tiny_llama, PROMPT, 2)


def test_trace_memory_cap_stops_the_run_with_a_reason(tiny_llama):
    """A run stops before the step that would pass the cap (issue 17: the cap is checked before recording)."""
    free = kvviz.Session(tiny_llama, PROMPT, 30, parity=False, stop_at_eos=False).run()
    cap = free.steps[0].nbytes() + sum(s.nbytes() for s in free.steps[1:6])  # room for prefill + 5 steps
    sess = kvviz.Session(tiny_llama, PROMPT, 30, parity=False, stop_at_eos=False, limits=Limits(max_trace_bytes=cap))
    t = sess.run()
    assert len(t.steps) == 6  # prefill + 5: the 6th decode step would not fit, so it never ran
    assert "cap" in sess.stopped_reason
    assert sess.trace_bytes() == t.nbytes() <= cap


# =====================================================================================================
# issue 17: a classroom server one visitor cannot break
# =====================================================================================================
class _TouchOnUnpickle:
    """Unpickling this creates a file: the proof that a checkpoint's pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _config(**fields: Any) -> dict[str, Any]:
    return {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "hidden_size": 64, "intermediate_size": 128, "vocab_size": 384, "max_position_embeddings": 128, **fields}


@pytest.fixture(scope="module")
def hostile(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Checkpoints a careless or hostile visitor may point kvviz at: copies of the tiny model, one thing wrong each."""
    import json

    root = tmp_path_factory.mktemp("hostile")

    def copy(name: str) -> Path:
        path = root / name
        shutil.copytree(tiny_checkpoint, path)
        return path

    out = {"marker": root / "pickle-code-ran"}
    out["pickle"] = copy("pickle")  # only pytorch_model.bin, whose unpickling would create the marker
    (out["pickle"] / "model.safetensors").unlink()
    torch.save({"payload": _TouchOnUnpickle(out["marker"])}, out["pickle"] / "pytorch_model.bin")
    out["garbage"] = copy("garbage")
    (out["garbage"] / "model.safetensors").write_bytes(b"\x00\x01 not safetensors " * 64)
    out["deep"] = copy("deep")
    (out["deep"] / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    out["zero_heads"] = copy("zero_heads")
    (out["zero_heads"] / "config.json").write_text(json.dumps(_config(num_attention_heads=0)))
    out["layers"] = copy("layers")
    (out["layers"] / "config.json").write_text(json.dumps(_config(num_hidden_layers=100_000)))
    out["nan"] = copy("nan")
    lm = kvviz.load_model(str(tiny_checkpoint))
    with torch.no_grad():
        for p in lm.model.parameters():
            p.fill_(float("nan"))
    lm.model.save_pretrained(out["nan"])
    return out


# -- 17.1 one upload takes the server down --------------------------------------------------------------
def test_17_1_a_million_layer_config_is_refused_at_once_without_allocating(hostile, monkeypatch):
    """Guards issue 17.1: a one-line config with 1e6 layers grew the server by 2.5 GiB (layers built on the meta
    device); a checkpoint with 1e5 layers was not refused before allocating."""
    import json
    import tracemalloc

    from transformers import AutoModelForCausalLM

    from kvviz.economics import memory as mem

    million = json.dumps(_config(num_hidden_layers=1_000_000))
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(kvviz.InputError, match=r"num_hidden_layers in config.json must be at most 1024"):
        mem.spec_from_config(mem.parse_config_json(million, source="config.json"), "upload")
    with pytest.raises(kvviz.InputError, match="must be at most 1024"):
        mem.spec_from_config(json.loads(million), "a dict from anywhere")  # the spec checks what it is handed too
    elapsed, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 5 * 2**20, (elapsed, peak)

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights were loaded for a config that must be refused")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(kvviz.InputError, match=r"num_hidden_layers .* must be at most 1024, got 100000"):
        kvviz.load_model(str(hostile["layers"]))

    # the parameter count is arithmetic: the largest config the bounds allow counts at once
    largest = _config(num_hidden_layers=1024, num_attention_heads=1024, num_key_value_heads=1024, hidden_size=131_072,
                      intermediate_size=2**20, vocab_size=2**22, num_local_experts=1024)
    t0 = time.perf_counter()
    assert mem.count_parameters(largest) > 10**15
    assert time.perf_counter() - t0 < 0.1


def test_17_1_uploads_are_small_and_leave_nothing_behind():
    """Guards issue 17.1: five distinct 38 MB uploads leaked ~38 MB each (a cache keyed by the whole upload) under
    Streamlit's default 200 MB upload limit."""
    import json
    import tomllib
    import tracemalloc

    from kvviz.economics import memory as mem

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] == 1  # MB: a config.json is a few KB
    with pytest.raises(kvviz.InputError, match=r"MiB; a config.json is a few KB"):
        mem.parse_config_json(b" " * (2**20 + 1) + b"{}")

    def upload(i: int) -> None:
        padded = json.dumps({**_config(num_hidden_layers=i + 1), "_padding": "x" * 900_000})
        mem.spec_from_config(mem.parse_config_json(padded.encode()), f"upload {i}")

    upload(99)  # warm up whatever imports allocate
    tracemalloc.start()
    for i in range(5):
        upload(i)
    kept = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert kept < 2**20, f"{kept} bytes kept after five distinct ~1 MB uploads"


# -- 17.2 memory per visitor, and per process ----------------------------------------------------------
def test_17_2_the_trace_cap_is_checked_before_recording_with_an_estimate_for_prefill(tiny_llama):
    """Guards issue 17.2: a 1 MiB cap ended a run only after prefill had recorded 78 MiB."""
    prompt = " a" * 100  # 100 tokens
    free = kvviz.Session(tiny_llama, prompt, 3, parity=False, stop_at_eos=False)
    estimate = free.step_bytes(len(free.prompt_ids), len(free.prompt_ids))
    free.run()
    assert estimate == free.steps[0].nbytes()  # the estimate is the exact size for the correct cache
    with pytest.raises(kvviz.InputError, match=r"prefill of this \d+-token prompt would record about .* shorten"):
        kvviz.Session(tiny_llama, prompt, 3, limits=Limits(max_trace_bytes=estimate - 1))
    # a buggy cache records more (the attended K and V): the estimate stays an upper bound
    buggy = kvviz.Session(tiny_llama, PROMPT, 4, parity=False, stop_at_eos=False, bug="stale_cache")
    for _ in range(4):
        n = len(buggy.steps)
        need = buggy.step_bytes(len(buggy.prompt_ids), len(buggy._stale_ids) + len(buggy.prompt_ids)) if n == 0 \
            else buggy._next_step_bytes()
        assert buggy.step().nbytes() <= need


def test_17_2_all_runs_together_stay_under_the_process_cap(tiny_llama, monkeypatch):
    """Guards issue 17.2: three visitors took the server from 496 to 1346 MiB. Runs alive in the process share
    one budget (KVVIZ_MAX_TOTAL_TRACE_MB) and give it back when their session is dropped."""
    import gc

    from kvviz.engine.session import BUDGET

    prompt = " a" * 110  # 110 tokens: prefill records ~0.8 MiB on the tiny model
    gc.collect()
    base = BUDGET.used
    monkeypatch.setenv("KVVIZ_MAX_TOTAL_TRACE_MB", str(1 + base // 2**20))
    first = kvviz.Session(tiny_llama, prompt, 2, parity=False, stop_at_eos=False)
    first.step()
    assert BUDGET.used - base == first.trace_bytes() > 0.5 * 2**20
    second = kvviz.Session(tiny_llama, prompt, 2, parity=False, stop_at_eos=False)
    with pytest.raises(kvviz.InputError, match=r"server is holding .* of recorded runs for all its visitors"):
        second.step()
    assert not second.steps and BUDGET.used - base == first.trace_bytes()
    del first
    gc.collect()
    assert BUDGET.used == base
    second.step()  # room again
    assert len(second.steps) == 1


def test_17_2_trace_exports_are_capped_and_written_piece_by_piece(bundled, monkeypatch):
    """Guards issue 17.2: "Trace with all arrays" of a 480-token prompt made a 170 MiB file and +626 MiB on the server."""
    import json
    import tracemalloc

    t = kvviz.trace(bundled, PROMPT * 6, 4, parity=False)
    strict = json.loads(t.export(arrays=True, max_bytes=2**30), parse_constant=lambda c: pytest.fail(c))
    assert strict == json.loads(t.to_json(arrays=True))
    size = len(t.export(arrays=True, max_bytes=2**30))
    assert 0.8 < t.export_size(arrays=True) / size < 1.3  # the up-front estimate is close
    tracemalloc.start()
    t.export(arrays=True, max_bytes=2**30)
    streamed = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    t.to_json(arrays=True)
    whole = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert streamed < 1.5 * size < whole, (streamed, size, whole)
    monkeypatch.setenv("KVVIZ_MAX_EXPORT_MB", "1")  # the deployment's cap is the default
    with pytest.raises(kvviz.InputError, match=r"with all arrays would be about .* above this server's export cap of 1"):
        t.export(arrays=True)
    assert json.loads(t.export())["generated_ids"] == list(t.generated_ids)  # the summary still fits


# -- 17.3 tracebacks with server paths -----------------------------------------------------------------------
@pytest.mark.parametrize("kind,needle", [
    ("garbage", "are not a valid safetensors file"),
    ("pickle", "has only pickle weights (pytorch_model.bin), which kvviz does not load because unpickling can run code"),
    ("deep", "nests too deeply to be a config.json"),
    ("zero_heads", "num_attention_heads in .* must be at least 1, got 0"),
])
def test_17_3_broken_checkpoints_give_one_line_never_a_library_traceback(hostile, tiny_checkpoint, capsys, kind, needle):
    """Guards issue 17.3: raw SafetensorError; UnpicklingError advising weights_only=False; RecursionError;
    a zero-head config reported as "cannot fetch from the Hugging Face hub (ZeroDivisionError)"."""
    import re

    path = str(hostile[kind])
    with pytest.raises(kvviz.InputError) as err:
        kvviz.load_model(path)
    message = str(err.value)
    assert re.search(needle if "*" in needle else re.escape(needle), message), message
    assert "\n" not in message and "weights_only" not in message and "hub" not in message
    assert not hostile["marker"].exists()  # the pickle never ran

    at = home_page(tiny_checkpoint)
    assert re.search(needle if "*" in needle else re.escape(needle), load_in_sidebar(at, path))
    code, err_text = run_main(capsys, "trace", "--model", path, "--prompt", PROMPT)
    assert_one_line_error(code, err_text, "")


def test_17_3_pickles_stay_refused_even_when_a_deployment_allows_them(hostile, monkeypatch):
    """KVVIZ_ALLOW_PICKLE=1 lets transformers read .bin files, but only with torch's weights_only loader: the
    payload is refused, never run, and the message does not advise weights_only=False."""
    monkeypatch.setenv("KVVIZ_ALLOW_PICKLE", "1")
    with pytest.raises(kvviz.ModelLoadError, match="not a loadable checkpoint") as err:
        kvviz.load_model(str(hostile["pickle"]))
    assert "weights_only" not in str(err.value)
    assert not hostile["marker"].exists()


def test_17_3_error_details_are_off_for_deployments():
    """Guards issue 17.3: client.showErrorDetails was at its "full" default (tracebacks with server paths)."""
    import tomllib

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["client"]["showErrorDetails"] == "none"


# -- 17.4 one allow-list ----------------------------------------------------------------------------------
def test_17_4_config_reads_go_through_the_allow_list_with_one_message(tiny_checkpoint, tmp_path, monkeypatch):
    """Guards issue 17.4: the memory page's "hub id or path" box ignored KVVIZ_ALLOWED_MODELS and read any server
    path, and two different messages told a visitor whether a path existed."""
    from kvviz.economics import memory as mem

    monkeypatch.setenv("KVVIZ_ALLOWED_MODELS", f"bundled,{tiny_checkpoint}")
    assert mem.load_config_source(str(tiny_checkpoint))["num_hidden_layers"] == 2  # listed
    assert mem.load_config_source("llama-3-8b")["num_hidden_layers"] == 32  # presets ship with kvviz
    existing, missing = str(tiny_checkpoint.parent), str(tmp_path / "no-such-dir")
    messages = []
    for path in (existing, missing, existing + "/config.json", "/etc/passwd"):
        for read in (mem.load_config_source, kvviz.load_model):
            with pytest.raises(kvviz.InputError, match="is not allowed on this deployment") as err:
                read(path)
            messages.append(str(err.value).replace(repr(path), "NAME"))
    assert len(set(messages)) == 1, set(messages)
    monkeypatch.setenv("KVVIZ_ALLOWED_MODELS", f"bundled,{tiny_checkpoint}/")  # written another way: the same path
    assert kvviz.load_model(str(tiny_checkpoint)).info.num_layers == 2


def test_17_4_an_allowed_hub_id_never_reads_a_folder_of_that_name(tiny_checkpoint, tmp_path, monkeypatch):
    """Guards issue 17.4: an allowed id such as `gpt2` loaded a ./gpt2 folder from the server's working directory."""
    import huggingface_hub.constants

    from kvviz.engine import models

    shutil.copytree(tiny_checkpoint, tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("KVVIZ_ALLOWED_MODELS", "gpt2,kvviz-tests/tiny")
    with pytest.raises(kvviz.ModelLoadError, match="cannot fetch 'gpt2' from the Hugging Face hub"):
        kvviz.load_model("gpt2")
    with pytest.raises(kvviz.ModelLoadError, match="cannot fetch 'gpt2'"):
        models.read_model_config("gpt2")
    with pytest.raises(kvviz.ModelLoadError, match="not allowed"):
        kvviz.load_model("./gpt2")  # the folder itself is not listed
    # a hub id comes from the HF cache (here filled by hand, as a download would)
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--kvviz-tests--tiny" / "snapshots" / commit
    shutil.copytree(tiny_checkpoint, snapshot)
    (cache / "models--kvviz-tests--tiny" / "refs").mkdir()
    (cache / "models--kvviz-tests--tiny" / "refs" / "main").write_text(commit)
    lm = kvviz.load_model("kvviz-tests/tiny")
    assert lm.name == "kvviz-tests/tiny" and lm.info.num_layers == 2


def test_17_4_the_app_starts_on_the_first_allowed_model_and_a_one_entry_list_works(tiny_checkpoint, monkeypatch):
    """Guards issue 17.4: with the default model missing from the list every page said "No model loaded", and a
    one-entry list could not be selected."""
    monkeypatch.setenv("KVVIZ_ALLOWED_MODELS", str(tiny_checkpoint))  # one entry; the default "bundled" is not on it
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert errors(at) == []
    assert at.session_state["model_name"] == str(tiny_checkpoint)
    assert at.selectbox(key="model_choice").options == [str(tiny_checkpoint)]
    generate(at)
    assert errors(at) == [] and at.dataframe
    at.switch_page(STEP_PAGE).run()
    assert errors(at) == [] and len(at.session_state["step_session"].steps) == 1


@pytest.mark.parametrize("page", PAGE_FILES)
def test_17_4_a_bad_setting_stops_every_page_with_one_message(page, monkeypatch, capsys):
    """Guards issue 17.4: an invalid cap value gave a traceback on every page instead of stopping at startup."""
    monkeypatch.setenv("KVVIZ_MAX_NEW_TOKENS", "lots")
    at = AppTest.from_file(str(ROOT / "pages" / page), default_timeout=60)  # as a deep link: the page alone
    at.run()
    shown = errors(at)
    assert len(shown) == 1 and "misconfigured" in shown[0] and "KVVIZ_MAX_NEW_TOKENS='lots'" in shown[0], shown
    if page == PAGE_FILES[0]:
        assert_one_line_error(*run_main(capsys, "bugs"), "KVVIZ_MAX_NEW_TOKENS='lots' must be a whole number")


# -- 17.5 NaN weights pass as "end of text" ----------------------------------------------------------------
@pytest.mark.parametrize("sampling", [None, kvviz.Sampling(greedy=False, temperature=0.8, seed=1)],
                         ids=["greedy", "sampled"])
def test_17_5_non_finite_logits_stop_the_run_with_a_clear_message(hostile, sampling):
    """Guards issue 17.5: greedy picked id 0 (end of text) and said the model finished; sampling raised RuntimeError."""
    lm = kvviz.load_model(str(hostile["nan"]))
    sess = kvviz.Session(lm, PROMPT, 4, sampling=sampling)
    with pytest.raises(RunAborted, match="logits at step 0 are NaN or infinite"):
        sess.step()
    assert sess.done and "not finite" in sess.stopped_reason and "end-of-text" not in sess.stopped_reason
    assert sess.steps == []


def test_17_5_json_is_strict_everywhere(tiny_llama, hostile, capsys):
    """Guards issue 17.5: the JSON export contained `NaN` (not JSON); parity showed "nan"."""
    import dataclasses
    import json

    t = kvviz.trace(tiny_llama, PROMPT, 2)
    broken = dataclasses.replace(t, steps=(dataclasses.replace(t.steps[0], max_abs_logit_diff=float("nan"),
                                                               entropy=float("inf")), *t.steps[1:]))

    def strict(text: str | bytes) -> Any:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))

    for text in (broken.to_json(), broken.to_json(arrays=True), broken.export(), broken.export(arrays=True)):
        step = strict(text)["steps"][0]
        assert step["max_abs_logit_diff"] is None and step["entropy"] is None

    at = home_page(hostile["nan"])
    generate(at)
    assert any("NaN or infinite" in e for e in errors(at)) and not at.dataframe
    code, err = run_main(capsys, "trace", "--model", str(hostile["nan"]), "--prompt", PROMPT, "--json")
    assert_one_line_error(code, err, "NaN or infinite")


# -- 17.6 user text rendered as Markdown ----------------------------------------------------------------------
HOSTILE_TEXT = ("[link](http://example.com) ![img](http://127.0.0.1:9/x.png) **bold** $x^2$ `tick :red[red] :smile: "
                "https://evil.example www.evil.example a@b.example <b>html</b> ~~strike~~\n# heading\n| a | b |\n|---|---|")


def test_17_6_escape_leaves_no_markdown_and_round_trips():
    """Guards issue 17.6 at the unit level (the browser test below checks what Streamlit draws)."""
    from kvviz.ui import kit

    escaped = kit.escape(HOSTILE_TEXT)
    assert unescape(escaped) == HOSTILE_TEXT
    bare = escaped.replace("\\\\", "")
    for i, ch in enumerate(bare):  # every Markdown-significant character is escaped
        if ch in "[]()!*$`:<>~#|_" and (i == 0 or bare[i - 1] != "\\"):
            pytest.fail(f"unescaped {ch!r} at {i}: {bare[max(0, i - 10): i + 10]!r}")
    assert "https:\\:\u2060" not in escaped and "https\\:\u2060" in escaped  # the URL is broken up for the linkifier


@pytest.fixture(scope="module")
def long_context_checkpoint(tmp_path_factory) -> Path:
    """The tiny GQA Llama with 512 positions: the hostile prompt is ~180 byte tokens, over the usual 128."""
    from kvviz.testing import tiny_model

    lm = tiny_model("llama_gqa", seed=1, max_positions=512)
    path = tmp_path_factory.mktemp("tiny-llama-512")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def test_17_6_home_and_the_sidebar_escape_what_a_visitor_typed(long_context_checkpoint, monkeypatch):
    """Guards issue 17.6: on Home's quick run and in the sidebar error, links, images, bold and KaTeX rendered."""
    from kvviz.ui import kit

    at = home_page(long_context_checkpoint)
    next(t for t in at.text_input if t.label == "Prompt").input(HOSTILE_TEXT.replace("\n", " "))
    generate(at)
    assert errors(at) == []
    out = next(m.value for m in at.markdown if m.value.startswith("**Prompt:**"))
    assert out.startswith("**Prompt:** " + kit.escape(HOSTILE_TEXT.replace("\n", " ")) + "  \n**Continuation:** ")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at.selectbox(key="model_choice").set_value("other…").run()
    at.text_input(key="model_custom").input("![img](http://127.0.0.1:9/x.png)").run()
    raw = [e.value for e in at.error]
    assert raw and "![img]" not in raw[0] and "\\!\\[img\\]" in raw[0]


def test_17_6_a_hostile_prompt_renders_as_text_in_chromium(chromium, long_context_checkpoint):
    """What the visitor's browser draws from Home's quick run: no link, image, bold, code or KaTeX from the prompt."""
    import subprocess

    from playwright.sync_api import sync_playwright

    from scripts.browser import IDLE, free_port, launch, start_app, wait_healthy

    port = free_port()
    proc = start_app(port, model=str(long_context_checkpoint))
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, timeout=120)
        with sync_playwright() as p:
            browser = launch(p, chromium)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/", timeout=120_000)
            page.wait_for_selector(IDLE, timeout=120_000)
            prompt = page.get_by_label("Prompt")
            prompt.fill(HOSTILE_TEXT.replace("\n", " "))
            page.get_by_role("button", name="Generate").click()
            page.wait_for_selector("[data-testid='stDataFrame']", timeout=120_000)
            page.wait_for_selector(IDLE, timeout=120_000)
            block = page.locator("[data-testid='stMarkdownContainer']", has_text="[link](http").first
            counts = block.evaluate("e => ['a', 'img', 'strong', 'code', '.katex', 'table', 'del', 'h1']"
                                    ".map(s => e.querySelectorAll(s).length)")
            text = block.inner_text().replace("\u2060", "")
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert counts == [0, 0, 2, 0, 0, 0, 0, 0], counts  # the two <strong> are kvviz's own labels (Prompt, Continuation)
    assert HOSTILE_TEXT.replace("\n", " ") in text


# -- 17.7 validation at the boundary ----------------------------------------------------------------------------
CLI_CASES = {  # the 17 tracebacks, then what was accepted silently
    "non-UTF-8 prompt": (["trace", "--prompt", "caf\udce9"], "not valid UTF-8"),
    "device cuda": (["trace", "--device", "cuda"], "not available on this machine"),
    "device bogus": (["trace", "--device", "bogus"], "unknown device 'bogus'"),
    "device meta": (["trace", "--device", "meta"], "not on 'meta'"),
    "temperature 1e-45": (["trace", "--temperature", "1e-45"], "temperature must be 0 (greedy) or at least 0.01"),
    "out to a missing folder": (["trace", "--out", "/no/such/folder/t.json"], "does not exist"),
    "out to a directory": (["trace", "--out", "/tmp"], "is a directory"),
    "pickle checkpoint": (["trace", "--model", "{pickle}"], "only pickle weights"),
    "garbage checkpoint": (["trace", "--model", "{garbage}"], "not a valid safetensors file"),
    "NaN model with sampling": (["trace", "--model", "{nan}", "--temperature", "0.8"], "NaN or infinite"),
    "deeply nested config": (["memory", "--config", "{deep}"], "nests too deeply"),
    "0 heads": (["memory", "--config", "{zero_heads}"], "num_attention_heads in"),
    "Infinity": (["memory", "--config", "{cfg:Infinity}"], "contains Infinity, which is not JSON"),
    "a list": (["memory", "--config", "{cfg:[32]}"], "must be a whole number, got [32]"),
    "10**400": (["memory", "--config", "{cfg:1" + "0" * 400 + "}"], "got a 401-digit number"),
    "2.5 KV heads": (["memory", "--config", "{kv:2.5}"], "num_key_value_heads in"),
    "1e5 layers checkpoint": (["trace", "--model", "{layers}"], "must be at most 1024, got 100000"),
    # accepted silently before
    "--heads -4": (["memory", "--layers", "2", "--kv-heads", "2", "--head-dim", "4", "--heads", "-4"],
                   "query heads must be at least 1, got -4"),
    "-6 layers": (["memory", "--config", "{cfg:-6}"], "num_hidden_layers in"),
    "16 KV heads for 8": (["memory", "--config", "{kv:16}"], "16 KV heads do not divide 8 query heads"),
    "--start-step 1000": (["diagnose", "--bug", "kv_swapped", "--steps", "8", "--start-step", "1000"],
                          "--start-step must be at most 8, got 1000"),
    "--top-p nan": (["trace", "--top-p", "nan"], "--top-p must be a finite number, got nan"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_17_7_every_bad_command_line_ends_in_one_line_and_exit_2(case, hostile, tiny_checkpoint, tmp_path, capsys):
    """Guards issue 17.7: 17 command lines ended in tracebacks, five more were accepted silently."""
    import json

    args, needle = CLI_CASES[case]

    def fill(arg: str) -> str:
        if arg.startswith("{cfg:") or arg.startswith("{kv:"):
            value = arg[arg.index(":") + 1:-1]
            key = "num_key_value_heads" if arg.startswith("{kv:") else "num_hidden_layers"
            path = tmp_path / "config.json"
            base = json.dumps(_config(num_attention_heads=8, **{key: 1}))
            path.write_text(base.replace(f'"{key}": 1', f'"{key}": {value}'))
            return str(path)
        return str(hostile[arg[1:-1]]) if arg.startswith("{") else arg

    argv = [fill(a) for a in args]
    if argv[0] in ("trace", "diagnose") and "--model" not in argv:
        argv += ["--model", str(tiny_checkpoint)]
    if argv[0] == "trace" and "--prompt" not in argv:
        argv += ["--prompt", PROMPT]
    code, err = run_main(capsys, *argv)
    assert code == 2
    assert_one_line_error(code, err, needle)


def test_17_7_the_api_refuses_what_it_cannot_mean(tiny_llama):
    """Guards issue 17.7: steps=nan skipped the cap (501 steps), 2.5 and True were accepted, prompt=123 raised
    AttributeError, steps='5' TypeError, out-of-vocabulary forced_ids IndexError; attention_matrix(step=10**9)
    quietly returned the last step and step=-1 failed with "max() arg is an empty sequence"."""
    for steps, needle in ((float("nan"), "got nan"), (2.5, "got 2.5"), (True, "got True"), ("5", "got '5'")):
        with pytest.raises(kvviz.InputError, match=f"steps must be a whole number, {needle}"):
            kvviz.Session(tiny_llama, PROMPT, steps)
        with pytest.raises(kvviz.InputError, match="steps must be a whole number"):
            kvviz.trace(tiny_llama, PROMPT, steps)
    with pytest.raises(kvviz.InputError, match=r"the prompt must be text .*got int"):
        kvviz.trace(tiny_llama, 123, 2)
    with pytest.raises(kvviz.InputError, match="each forced token id must be at most 383, got 100000"):
        kvviz.Session(tiny_llama, PROMPT, 2, forced_ids=[1, 100_000])
    with pytest.raises(kvviz.InputError, match="bug must be a registry name"):
        kvviz.Session(tiny_llama, PROMPT, 2, bug=7)
    for bad, needle in ((dict(temperature=float("nan")), "finite"), (dict(top_p=float("nan")), "finite"),
                        (dict(temperature=1e-45), "at least 0.01"), (dict(top_k=2.5), "whole number"),
                        (dict(seed=-1), "at least 0")):
        with pytest.raises(kvviz.InputError, match=needle):
            kvviz.Sampling(greedy=False, **bad)
    t = kvviz.trace(tiny_llama, PROMPT, 3)
    with pytest.raises(kvviz.InputError, match="step must be at most 2, got 1000000000"):
        t.attention_matrix(layer=0, head=0, step=10**9)
    with pytest.raises(kvviz.InputError, match="step must be at least 0, got -1"):
        t.attention_matrix(layer=0, head=0, step=-1)
    with pytest.raises(kvviz.InputError, match="layer must be at most 1"):
        t.keys(layer=5, step=0)
    with pytest.raises(kvviz.InputError, match="head must be at most 3"):
        t.attention_matrix(layer=0, head=4, step=0)


# -- 17.8 fairness under load -----------------------------------------------------------------------------------
@pytest.fixture
def queue_slots(monkeypatch) -> list[bool]:
    """Every slot taken from the fair model queue, as its `exclusive` flag, in order."""
    from kvviz.engine import work

    taken: list[bool] = []
    real = work.FairQueue.slot

    def spy(self: work.FairQueue, exclusive: bool = False, on_wait: Any = None) -> Any:
        taken.append(exclusive)
        return real(self, exclusive, on_wait)

    monkeypatch.setattr(work.FairQueue, "slot", spy)
    return taken


def test_17_8_pages_do_model_work_through_the_fair_queue_and_measure_only_on_request(tiny_checkpoint, queue_slots):
    """Guards issue 17.8: every session's CPU work ran at once, and the cost page started a timing run on each first
    visit."""
    at = home_page(tiny_checkpoint)
    generate(at)
    assert errors(at) == [] and queue_slots == [False]  # Home's quick run took one slot
    at.switch_page(str(ROOT / "pages" / "cost.py")).run()
    assert errors(at) == [] and queue_slots == [False]  # a visit measures nothing
    at.multiselect(key="cost_contexts").set_value([8, 16])
    at.number_input(key="cost_repeats").set_value(1)
    next(b for b in at.button if "Run the measurements" in b.label).click().run()
    assert errors(at) == [] and queue_slots == [False, True]  # the measurement ran alone
    assert at.session_state["cost_sweep"] is not None


def test_17_8_the_step_page_prefills_and_steps_through_the_fair_queue(tiny_checkpoint, queue_slots):
    """Guards issue 17.8 on the step page (the Bug lab and serving page wrap their runs the same way)."""
    at = step_page(tiny_checkpoint)
    assert queue_slots == [False]  # the prefill
    still_steps(at)
    assert queue_slots == [False, False]  # the step


def test_17_8_a_timing_runs_thread_count_never_reaches_another_visitors_work():
    """Guards issue 17.8: the cost page's thread setting applied to the whole process (another visitor's run used
    8 threads). The timing run holds the whole queue while it changes torch's threads."""
    import threading

    from kvviz.economics.cost import torch_threads
    from kvviz.engine.work import FairQueue

    q = FairQueue(workers=4, poll_seconds=0.01)
    default = torch.get_num_threads()
    timing_started, seen = threading.Event(), []

    def timing() -> None:
        with q.slot(exclusive=True), torch_threads(default + 2):
            timing_started.set()
            time.sleep(0.3)

    def visitor() -> None:
        timing_started.wait(10)
        with q.slot():
            seen.append(torch.get_num_threads())

    threads = [threading.Thread(target=timing), *(threading.Thread(target=visitor) for _ in range(3))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert seen == [default] * 3
