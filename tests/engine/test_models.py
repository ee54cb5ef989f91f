"""Loading models: device and dtype choice, local checkpoints, the deployment allow-list, remote code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

import kvviz
from kvviz.engine import models

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "It is a truth universally acknowledged, that"


# -- device and dtype -------------------------------------------------------------------------------------
@pytest.fixture
def accelerators(monkeypatch):
    """Pretend which accelerators exist: set(cuda=..., mps=..., bf16=...)."""

    def set_(cuda: bool = False, mps: bool = False, bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return set_


@pytest.mark.parametrize("cuda,mps,expected", [
    (True, True, "cuda"),  # CUDA first, even when MPS exists
    (False, True, "mps"),
    (False, False, "cpu"),
])
def test_device_pick_cuda_then_mps_then_cpu(accelerators, cuda, mps, expected):
    accelerators(cuda=cuda, mps=mps)
    assert models.pick_device().type == expected
    assert models.pick_device("cpu").type == "cpu"  # an explicit choice wins


def test_dtype_per_device(accelerators):
    assert models.pick_dtype(torch.device("cpu")) == torch.float32  # exact parity, no slow half kernels
    assert models.pick_dtype(torch.device("mps")) == torch.float16
    accelerators(cuda=True, bf16=True)
    assert models.pick_dtype(torch.device("cuda")) == torch.bfloat16
    accelerators(cuda=True, bf16=False)
    assert models.pick_dtype(torch.device("cuda")) == torch.float16
    assert models.pick_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    assert models.pick_dtype(torch.device("cpu"), "torch.float16") == torch.float16
    with pytest.raises(kvviz.ModelLoadError, match="unknown dtype 'float7'"):
        models.pick_dtype(torch.device("cpu"), "float7")


# -- a local checkpoint directory -----------------------------------------------------------------------------
def test_local_checkpoint_directory_loads_and_traces(tiny_checkpoint):
    lm = kvviz.load_model(str(tiny_checkpoint))
    assert (lm.info.model_type, lm.info.num_layers, lm.info.num_heads, lm.info.num_key_value_heads) == ("llama", 2, 4, 2)
    assert (lm.info.device, lm.info.dtype, lm.info.max_positions) == ("cpu", "float32", 128)
    assert lm.model.config._attn_implementation == "kvviz"  # captured, not plain SDPA
    assert not lm.model.training
    t = kvviz.trace(lm, PROMPT, 4)
    assert len(t.steps) == 4
    assert all(s.max_abs_logit_diff < 1e-4 for s in t.steps)
    assert t.steps[-1].cache_len == len(t.prompt_ids) + 3


def test_a_half_precision_checkpoint_loads_in_float32_on_cpu(tiny_checkpoint, tmp_path):
    """Guards the note that an fp16 checkpoint loads as fp16 unless a dtype is asked for."""
    lm = kvviz.load_model(str(tiny_checkpoint))
    lm.model.to(torch.float16).save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    half = kvviz.load_model(str(tmp_path))
    assert half.info.dtype == "float32"
    assert next(half.model.parameters()).dtype == torch.float32


# -- the deployment allow-list ---------------------------------------------------------------------------------
def test_allowed_models_restrict_loading(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("KVVIZ_ALLOWED_MODELS", "bundled, gpt2")
    assert models.allowed_models() == ("bundled", "gpt2")
    with pytest.raises(kvviz.ModelLoadError, match=r"not allowed on this deployment; allowed: bundled, gpt2"):
        kvviz.load_model(str(tiny_checkpoint))
    monkeypatch.setenv("KVVIZ_ALLOWED_MODELS", f"bundled,{tiny_checkpoint}")
    assert kvviz.load_model(str(tiny_checkpoint)).info.num_layers == 2
    monkeypatch.setenv("KVVIZ_ALLOWED_MODELS", "")
    assert models.allowed_models() is None  # unset or empty: any model


def test_the_app_offers_only_the_allowed_models(tiny_checkpoint, monkeypatch):
    allowed = ("bundled", str(tiny_checkpoint))
    monkeypatch.setenv("KVVIZ_ALLOWED_MODELS", ",".join(allowed))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.session_state["model_name"] = str(tiny_checkpoint)
    at.run()
    assert not at.exception and not at.error
    choice = at.selectbox(key="model_choice")
    assert tuple(choice.options) == allowed  # no free-text "other…" to type an arbitrary model into
    assert choice.value == str(tiny_checkpoint)
    assert any("allows only" in c.value and str(tiny_checkpoint) in c.value for c in at.sidebar.caption)


# -- remote code ------------------------------------------------------------------------------------------------
def test_trust_remote_code_is_never_on(tmp_path):
    """A checkpoint that ships its own Python is refused, and its code never runs."""
    marker = tmp_path / "code-ran"
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "my_custom_lm",
        "architectures": ["MyModel"],
        "auto_map": {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyModel"},
    }))
    for module in ("configuration_my.py", "modeling_my.py"):
        (tmp_path / module).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(kvviz.ModelLoadError, match="trust_remote_code") as err:
        kvviz.load_model(str(tmp_path))
    assert "never runs remote code" in str(err.value)
    assert not marker.exists()
