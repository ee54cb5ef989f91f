"""Load a causal LM + tokenizer for kvviz: the bundled checkpoint, a local directory or a hub id.

Every load goes through the same checks, each with an error that says what to do:
- the name must be on the deployment's allow-list (KVVIZ_ALLOWED_MODELS), checked first, the same
  way for models and for configs (the memory page reads configs through `read_model_config`);
  with a list set, a local path must be written as one (/, ./, ~) and be listed, and a bare name
  is a hub id read from the HF cache, never a folder of that name in the working directory;
- the config.json must pass `engine.config`'s strict checks before transformers reads it,
  and be readable without `trust_remote_code` (never enabled);
- the model must be a decoder-only causal LM (encoders like BERT have no growing KV cache),
- its weights must fit in the memory available, counted by arithmetic from the config;
- the weights must be safetensors (pickle files can run code when loaded) unless the deployment
  sets KVVIZ_ALLOW_PICKLE=1; a damaged file is named, not shown as a library's traceback.
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
from kvviz.engine.config import parameter_count, read_config_file
from kvviz.engine.trace import ModelInfo
from kvviz.geometry import human_bytes, kv_geometry
from kvviz.validate import InputError, one_line, settings

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "bundled"
BUNDLED = "bundled"
# Offered in the UI; they work for users who are online.
SUGGESTED_MODELS = ("bundled", "gpt2", "distilgpt2", "HuggingFaceTB/SmolLM2-135M", "Qwen/Qwen2.5-0.5B")
# Share of the currently available memory the weights may take (room for activations and cache).
MEMORY_HEADROOM = 0.7


# what a hub snapshot needs: the config, the tokenizer's files, the weights
HUB_FILES = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
             "vocab*", "merges.txt", "*.model", "*.safetensors", "model.safetensors.index.json"]
PICKLE_FILES = ["*.bin", "pytorch_model.bin.index.json"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelLoadError(InputError):
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


DEVICE_TYPES = ("cpu", "cuda", "mps")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA if available, then Apple MPS, else CPU; or the one asked for, if it exists here."""
    if device is None or device == "":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise ModelLoadError(f"the device must be cpu, cuda or mps, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ModelLoadError(f"unknown device {str(device)[:40]!r}: use cpu, cuda or mps") from None
    if dev.type not in DEVICE_TYPES:  # meta holds no numbers; xla, hpu, ... are not what kvviz is tested on
        raise ModelLoadError(f"kvviz runs models on cpu, cuda or mps, not on {dev.type!r}")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ModelLoadError(f"device {str(dev)!r} is not available on this machine: use cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("device 'mps' is not available on this machine: use cpu")
    return dev


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """float32 on CPU (exact parity, no slow half kernels); half precision on accelerators."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        found = getattr(torch, str(dtype).replace("torch.", ""), None)
        if found not in (torch.float32, torch.float16, torch.bfloat16):
            raise ModelLoadError(f"unknown dtype {str(dtype)[:40]!r}; use float32, float16 or bfloat16")
        return found
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


# -- which model a name means, and whether this deployment allows it ---------------------------------
def is_path_like(name: str) -> bool:
    """Written as a path: absolute, ./ ../ or ~. With an allow-list, only these are local paths:
    a bare `gpt2` is the hub id even when the server's working directory has a ./gpt2 folder."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..")


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def allowed_models() -> tuple[str, ...] | None:
    """The models a shared deployment allows (KVVIZ_ALLOWED_MODELS, comma-separated), or None for any."""
    return settings().allowed_models


def is_allowed(name: str) -> bool:
    names = allowed_models()
    if names is None or name in names:
        return True
    # a listed path matches however it is written (./x, x/, a symlink to it); a hub id matches exactly
    return is_path_like(name) and any(is_path_like(n) and _same_path(n, name) for n in names)


def check_allowed(name: str) -> None:
    """The one gate for every place that reads a model or a config (KVVIZ_ALLOWED_MODELS).

    Called before the name touches the file system or the network, so the message is the same
    whether or not such a path exists on the server.
    """
    if not is_allowed(name.strip()):
        names = allowed_models() or ()
        raise ModelLoadError(f"model {name.strip()[:80]!r} is not allowed on this deployment; "
                             f"allowed: {', '.join(names)}")


def resolve(name: str) -> str:
    """The local directory (bundled, a path) or hub id a kvviz model name means (no checks)."""
    name = name.strip()
    if name in ("", BUNDLED):
        if not (BUNDLED_DIR / "config.json").exists():
            raise ModelLoadError(f"the bundled model is missing from {BUNDLED_DIR}; reinstall kvviz or pass a model")
        return str(BUNDLED_DIR)
    return name


def is_local(name: str) -> bool:
    """Is `name` (resolved) a local directory rather than a hub id? With an allow-list, only when
    written as a path; without one a bare name that exists here is local too (a developer's folder)."""
    target = resolve(name)
    if target == str(BUNDLED_DIR) or is_path_like(target):
        return True
    return allowed_models() is None and Path(target).exists()


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


def _cannot_fetch(name: str) -> ModelLoadError:
    return ModelLoadError(f"cannot fetch {name[:80]!r} from the Hugging Face hub: offline, or no such model. "
                          "Use the bundled model, or a local checkpoint directory.")


def hub_dir(repo_id: str, patterns: list[str]) -> Path:
    """The local snapshot of a hub model holding `patterns` (downloaded when online, else the HF cache).

    Always an absolute path in the HF cache: transformers is never handed the bare id, which it
    would read from a folder of that name in the working directory if there was one.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError:
        raise ModelLoadError(f"{repo_id[:80]!r} is neither a local checkpoint directory nor a hub id") from None
    try:
        path = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=not hub_reachable())
    except Exception:  # offline, unknown, gated, network stacks' many errors
        raise _cannot_fetch(repo_id) from None
    if not (Path(path) / "config.json").is_file():
        raise _cannot_fetch(repo_id)
    return Path(path)


def model_dir(name: str, patterns: list[str]) -> Path:
    """The directory to read `name` from (after `check_allowed`): bundled, a local path or a hub snapshot."""
    target = resolve(name)
    if is_local(name):
        path = Path(target).expanduser()
        if not path.exists():
            raise ModelLoadError(f"no model directory at {target[:200]!r}")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{target[:200]!r} is not a model directory (it has no config.json)")
        return path.resolve()
    if target.count("/") > 1:
        raise ModelLoadError(f"no model directory at {target[:200]!r}")
    return hub_dir(target, patterns)


def read_model_config(name: str) -> dict[str, Any]:
    """A model's config.json as a checked dict (bounded fields, strict JSON), nothing built."""
    check_allowed(name)
    return read_config_file(model_dir(name, ["config.json"]))


def load_config(name: str) -> Any:
    """AutoConfig for a model name, after the allow-list and the strict checks; ModelLoadError on failure."""
    from transformers import AutoConfig

    read_model_config(name)  # the gate, and the fields checked before transformers divides by them
    path = model_dir(name, ["config.json"])
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelLoadError(
                f"model {name!r} needs trust_remote_code=True (it ships its own Python code); kvviz never runs "
                "remote code by default. Pick a model transformers supports natively."
            ) from None
        raise ModelLoadError(f"cannot read the config of {name!r}: {_no_paths(e, path, name)}") from None
    except Exception as e:  # a config transformers cannot use: one line, never its traceback
        raise ModelLoadError(f"cannot read the config of {name!r} ({type(e).__name__}): {_no_paths(e, path, name)}") from None


def _no_paths(error: BaseException, path: Path, name: str) -> str:
    """A library's message on one line, with the server's directory replaced by the name the user gave."""
    return one_line(str(error).replace(str(path), name).replace(str(BUNDLED_DIR), BUNDLED))


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
    """Bytes the weights will take, by arithmetic from the config's bounded fields (nothing built)."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    return parameter_count(cfg) * torch.empty((), dtype=dtype).element_size()


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


def check_weights(name: str, path: Path, allow_pickle: bool) -> None:
    """Refuse a checkpoint without safetensors weights before transformers looks for them."""
    files = [p.name for p in path.iterdir()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        raise ModelLoadError(
            f"model {name!r} has only pickle weights ({pickles[0]}), which kvviz does not load because unpickling "
            "can run code; convert them to safetensors (model.safetensors)"
        )
    if not pickles:
        raise ModelLoadError(f"model {name!r} has no weights (model.safetensors) in its directory")


def _weights_error(name: str, error: BaseException) -> ModelLoadError:
    """One line for a checkpoint that does not load, naming the file kind instead of a library's text.

    (torch's pickle errors advise `weights_only=False`, i.e. running the file's code: never shown.)"""
    kind = type(error).__name__
    if "safetensor" in kind.lower() or "safetensor" in str(error).lower()[:200]:
        return ModelLoadError(f"the weights of {name!r} are not a valid safetensors file (damaged or not weights)")
    if "unpickl" in kind.lower() or "pickle" in str(error).lower()[:300]:
        return ModelLoadError(f"the weights of {name!r} are not a loadable checkpoint (a refused or damaged pickle)")
    return ModelLoadError(f"cannot load the weights or tokenizer of {name!r} ({kind})")


def load_model(name: str = BUNDLED, device: str | None = None, dtype: str | torch.dtype | None = None) -> LoadedModel:
    """Load `name` ("bundled", a local checkpoint directory, or a hub id) for kvviz.

    Raises ModelLoadError with a one-line message fit for a user on any failure.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if not isinstance(name, str):
        raise ModelLoadError(f"the model must be a name or a path (a str), got {type(name).__name__}")
    name = name.strip()
    allow_pickle = settings().allow_pickle
    check_allowed(name)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dev, dtype)
    config = load_config(name)
    check_causal(name, config)
    check_fits(name, config, torch_dtype, dev)
    path = model_dir(name, HUB_FILES + (PICKLE_FILES if allow_pickle else []))
    check_weights(name, path, allow_pickle)
    capture.register()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=capture.ATTN_IMPLEMENTATION, trust_remote_code=False,
            local_files_only=True, use_safetensors=None if allow_pickle else True,
        )
    except torch.OutOfMemoryError:
        raise ModelLoadError(f"ran out of memory loading {name!r}; pick a smaller model") from None
    except Exception as e:  # damaged files raise many types (SafetensorError, UnpicklingError, OSError, ...)
        raise _weights_error(name, e) from None
    model = model.to(dev).eval()
    capture.instrument(model)
    display = BUNDLED if path == BUNDLED_DIR else name
    return LoadedModel(
        name=display, model=model, tokenizer=tokenizer, info=model_info(display, model),
        load_seconds=time.perf_counter() - t0, threads=preferred_threads(model),
    )
