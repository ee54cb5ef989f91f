"""Load a causal LM + tokenizer for kvviz: the bundled checkpoint, a local directory or a hub id.

Every load goes through the same checks, each with an error that says what to do:
- the config must be readable without `trust_remote_code` (never enabled by default),
- the model must be a decoder-only causal LM (encoders like BERT have no growing KV cache),
- its weights must fit in the memory available, estimated from the config before loading.
The model is loaded with kvviz's registered attention ("kvviz", see `capture.py`); it is put in
eval mode and must never be mutated afterwards: one loaded model is shared by every session.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvviz.engine import capture
from kvviz.engine.trace import ModelInfo
from kvviz.geometry import human_bytes, kv_geometry

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "bundled"
BUNDLED = "bundled"
# Offered in the UI; they work for users who are online.
SUGGESTED_MODELS = ("bundled", "gpt2", "distilgpt2", "HuggingFaceTB/SmolLM2-135M", "Qwen/Qwen2.5-0.5B")
# Share of the currently available memory the weights may take (room for activations and cache).
MEMORY_HEADROOM = 0.7


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says why and what to do instead."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for kvviz. Shared read-only: sessions keep their own state elsewhere."""

    name: str
    model: Any  # a transformers PreTrainedModel (causal LM), eval mode, attn_implementation="kvviz"
    tokenizer: Any
    info: ModelInfo
    load_seconds: float
    # CPU threads for this model's forwards (None = torch's default). See `preferred_threads`.
    threads: int | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def pick_device(device: str | None = None) -> torch.device:
    """CUDA if available, then Apple MPS, else CPU (or the one asked for)."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """float32 on CPU (exact parity, no slow half kernels); half precision on accelerators."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        try:
            return getattr(torch, dtype.replace("torch.", ""))
        except AttributeError as e:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16") from e
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def resolve(name: str) -> str:
    """The path or hub id `from_pretrained` should get for a kvviz model name."""
    name = name.strip()
    if name in ("", BUNDLED):
        if not (BUNDLED_DIR / "config.json").exists():
            raise ModelLoadError(f"the bundled model is missing from {BUNDLED_DIR}; reinstall kvviz or pass a model")
        return str(BUNDLED_DIR)
    return name


def allowed_models() -> tuple[str, ...] | None:
    """The models a shared deployment allows (KVVIZ_ALLOWED_MODELS, comma-separated), or None for any."""
    allowed = os.environ.get("KVVIZ_ALLOWED_MODELS", "").strip()
    if not allowed:
        return None
    return tuple(dict.fromkeys(n.strip() for n in allowed.split(",") if n.strip()))


def check_allowed(name: str) -> None:
    """Shared deployments restrict loadable models with KVVIZ_ALLOWED_MODELS (comma-separated)."""
    names = allowed_models()
    if names is None:
        return
    if name.strip() not in names:
        raise ModelLoadError(f"model {name!r} is not allowed on this deployment; allowed: {', '.join(sorted(names))}")


def hub_reachable(timeout: float = 2.0) -> bool:
    """Can the Hugging Face hub be reached? Checked up front because transformers retries a dead
    network for ~25 s before failing; when it cannot, only the local HF cache is used."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_config(name: str) -> Any:
    """AutoConfig for a path or hub id, translating every failure into a ModelLoadError."""
    from transformers import AutoConfig

    target = resolve(name)
    is_local = Path(target).exists()
    if not is_local and (target.startswith((".", "/", "~")) or target.count("/") > 1):
        raise ModelLoadError(f"no model directory at {target!r}")
    if is_local and not (Path(target) / "config.json").is_file():
        raise ModelLoadError(f"{target!r} is not a model directory (it has no config.json)")
    local_only = not is_local and not hub_reachable()
    try:
        return AutoConfig.from_pretrained(target, trust_remote_code=False, local_files_only=local_only)
    except ValueError as e:
        msg = str(e)
        if "trust_remote_code" in msg:
            raise ModelLoadError(
                f"model {name!r} needs trust_remote_code=True (it ships its own Python code); kvviz never runs "
                "remote code by default. Pick a model transformers supports natively."
            ) from e
        raise ModelLoadError(f"cannot read the config of {name!r}: {msg.splitlines()[0]}") from e
    except OSError as e:
        if is_local:
            raise ModelLoadError(f"{target!r} is not a model directory (no readable config.json)") from e
        raise ModelLoadError(
            f"cannot fetch {name!r} from the Hugging Face hub: offline, or no such model. "
            "Use the bundled model, or a local checkpoint directory."
        ) from e
    except Exception as e:  # network stacks raise many types (requests, httpx, hub errors)
        raise ModelLoadError(
            f"cannot fetch {name!r} from the Hugging Face hub ({type(e).__name__}): offline, or no such model. "
            "Use the bundled model, or a local checkpoint directory."
        ) from e


def check_causal(name: str, config: Any) -> None:
    """Refuse encoders and encoder-decoders: only a decoder-only causal LM has one growing KV cache."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(
            f"model {name!r} ({model_type}) is an encoder-decoder; kvviz shows decoder-only causal LMs "
            "(e.g. gpt2, Llama, Qwen2)."
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"model {name!r} ({model_type}) is not a causal language model, so it has no KV cache to show; "
            "pick a decoder-only model such as gpt2 or Qwen/Qwen2.5-0.5B."
        )
    # BERT-like families have a causal-LM head class but attend bidirectionally unless is_decoder
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise ModelLoadError(
            f"model {name!r} ({model_type}) is a bidirectional encoder, not a causal LM: it has no KV cache "
            "that grows token by token. Pick a decoder-only model such as gpt2."
        )


def estimate_weight_bytes(config: Any, dtype: torch.dtype) -> int:
    """Bytes the weights will take, counted on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in meta_model.parameters())
    return n_params * torch.empty((), dtype=dtype).element_size()


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits(name: str, config: Any, dtype: torch.dtype, device: torch.device, available: int | None = None) -> int:
    """Refuse before loading when the weights would not fit. Returns the estimate in bytes."""
    need = estimate_weight_bytes(config, dtype)
    have = available_bytes(device) if available is None else available
    if need > MEMORY_HEADROOM * have:
        raise ModelLoadError(
            f"model {name!r} needs about {human_bytes(need)} for its weights in {str(dtype).replace('torch.', '')}, "
            f"but only {human_bytes(have)} is free on {device.type} (kvviz uses at most "
            f"{MEMORY_HEADROOM:.0%}); pick a smaller model."
        )
    return need


def model_info(name: str, model: Any) -> ModelInfo:
    geo = kv_geometry(model.config)
    p = next(model.parameters())
    return ModelInfo(
        **dataclasses.asdict(geo),
        name=name,
        device=str(p.device),
        dtype=str(p.dtype).replace("torch.", ""),
    )


# Below this many parameters a CPU forward is mostly Python and small kernels: a second thread
# only adds synchronisation, and on a busy 2-core machine it waits for a core (the bundled model's
# cached step: 15-17 ms on 1 thread vs 160-330 ms on 2 with the machine at load 7-9; see README).
SMALL_MODEL_PARAMS = 30_000_000


def preferred_threads(model: Any) -> int | None:
    """CPU threads that make `model`'s forwards fastest: 1 for small models, else torch's default (None)."""
    p = next(model.parameters())
    if p.device.type != "cpu":
        return None
    return 1 if sum(x.numel() for x in model.parameters()) <= SMALL_MODEL_PARAMS else None


@contextmanager
def using_threads(threads: int | None) -> Iterator[None]:
    """Run a block with `threads` torch CPU threads, then restore the previous count.

    torch's thread count is process-wide, so a model's preference is applied around its own
    forwards only (a session's step), never left behind for other code or models.
    """
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if before != threads:
            torch.set_num_threads(before)


def prepare(model: Any) -> Any:
    """Route a freshly built model's attention through kvviz's capturing function (load time only)."""
    capture.register()
    model.set_attn_implementation(capture.ATTN_IMPLEMENTATION)
    capture.instrument(model)
    return model.eval()


def from_model(model: Any, tokenizer: Any, name: str = "custom") -> LoadedModel:
    """Wrap a model you built yourself (e.g. from a config in a test or notebook)."""
    return LoadedModel(name=name, model=prepare(model), tokenizer=tokenizer, info=model_info(name, model), load_seconds=0.0,
                       threads=preferred_threads(model))


def load_model(name: str = BUNDLED, device: str | None = None, dtype: str | torch.dtype | None = None) -> LoadedModel:
    """Load `name` ("bundled", a local checkpoint directory, or a hub id) for kvviz.

    Raises ModelLoadError with a message fit for a user on any failure.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    check_allowed(name)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dev, dtype)
    config = load_config(name)
    check_causal(name, config)
    check_fits(name, config, torch_dtype, dev)
    target = resolve(name)
    capture.register()
    local_only = not Path(target).exists() and not hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=False, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(
            target, dtype=torch_dtype, attn_implementation=capture.ATTN_IMPLEMENTATION,
            trust_remote_code=False, local_files_only=local_only,
        )
    except torch.OutOfMemoryError as e:
        raise ModelLoadError(f"ran out of memory loading {name!r}; pick a smaller model") from e
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the weights or tokenizer of {name!r}: {str(e).splitlines()[0]}") from e
    model = model.to(dev).eval()
    capture.instrument(model)
    display = BUNDLED if target == str(BUNDLED_DIR) else name
    return LoadedModel(
        name=display, model=model, tokenizer=tokenizer, info=model_info(display, model),
        load_seconds=time.perf_counter() - t0, threads=preferred_threads(model),
    )
