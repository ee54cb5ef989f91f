"""What a visitor sends, checked where it enters: one error type, one-line messages.

kvviz is deployed for classes: one process, many browsers, anyone typing or uploading anything.
Every value that comes from outside (a page's widgets, the command line, a notebook's call, the
environment of a deployment) is checked by the functions here before it reaches torch or numpy,
and every refusal is an `InputError` whose message is one line saying what to fix. Pages show
that line, the CLI prints it and exits 2; nothing else a visitor can cause should escape.

This module is the bottom of kvviz with `geometry.py`: it imports nothing from kvviz and no
torch, so every layer may use it.

    InputError            the one user-facing error type (ModelLoadError, RunAborted are kinds of it)
    whole_number()        an int in a range: refuses True, 2.5, nan, '5', 10**400
    real_number()         a finite float in a range: refuses nan, inf, True, '0.5'
    text()                a str that encodes as UTF-8 (a non-UTF-8 command line gives lone surrogates)
    finite_or_none()      JSON-ready data with NaN/inf replaced by None (strict JSON everywhere)
    dumps()               json.dumps of that, with allow_nan=False
    Settings / settings() every KVVIZ_* variable, read and checked in one place
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


class InputError(ValueError):
    """Bad input from a visitor, a caller or a deployment's settings; the message says how to fix it.

    One line, no traceback needed: pages show it, the CLI prints it after "kvviz: error:".
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(message: object) -> str:
    """A message on one line (a multi-line library error keeps its first line), at most 400 characters."""
    text = str(message).strip()
    first = text.splitlines()[0].strip() if text else ""
    return first if len(first) <= 400 else first[:397] + "..."


def _show(value: Any) -> str:
    """A value as a message shows it: short, one line (10**400 is not printed in full)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        return f"a {len(str(abs(value)))}-digit number"
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


# -- numbers and text ---------------------------------------------------------------------------------
def whole_number(value: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int in [lo, hi]. Ints only (numpy's too): True, 2.5, 5.0, nan and '5' are refused,
    because each of them has been passed by mistake and then silently meant something else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be a whole number, got {_show(value)}")
    value = int(value)
    if lo is not None and value < lo:
        raise InputError(f"{name} must be at least {lo}, got {_show(value)}")
    if hi is not None and value > hi:
        raise InputError(f"{name} must be at most {hi}, got {_show(value)}")
    return value


def real_number(value: Any, name: str, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False) -> float:
    """`value` as a finite float in [lo, hi] (or (lo, hi] with `lo_open`). Ints are fine; bools, strings,
    NaN and infinities are refused (NaN compares false with everything, so it slips past range checks)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {_show(value)}")
    try:
        x = float(value)
    except OverflowError:
        raise InputError(f"{name} is too large, got {_show(value)}") from None
    if not math.isfinite(x):
        raise InputError(f"{name} must be a finite number, got {x}")
    if lo is not None and (x <= lo if lo_open else x < lo):
        raise InputError(f"{name} must be {'above' if lo_open else 'at least'} {lo:g}, got {x:g}")
    if hi is not None and x > hi:
        raise InputError(f"{name} must be at most {hi:g}, got {x:g}")
    return x


def text(value: Any, name: str = "the prompt") -> str:
    """A str that is valid Unicode text. A command line in another encoding reaches Python as lone
    surrogates ('\\udcff'), which tokenizers reject with an unreadable error."""
    if not isinstance(value, str):
        raise InputError(f"{name} must be text (a str), got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{name} is not valid UTF-8 text: check your terminal's encoding") from None
    return value


def choice(value: Any, name: str, options: Iterable[str]) -> str:
    options = tuple(options)
    if value not in options:
        raise InputError(f"{name} must be one of {', '.join(options)}; got {_show(value)}")
    return value


# -- strict JSON ---------------------------------------------------------------------------------------
def finite_or_none(obj: Any) -> Any:
    """A copy of JSON-ready data (dicts, lists, tuples, numbers, str, None) with every NaN and
    infinity replaced by None: Python's json writes them as NaN/Infinity, which is not JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON: non-finite numbers become null (never `NaN`, which JSON parsers reject)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


# -- a deployment's settings ----------------------------------------------------------------------------
def _env_int(name: str, default: int, lo: int, hi: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"environment variable {name}={raw[:40]!r} must be a whole number") from None
    if not lo <= value <= hi:
        raise InputError(f"environment variable {name} must be between {lo} and {hi}, got {value}")
    return value


def _env_flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise InputError(f"environment variable {name}={raw[:40]!r} must be 1 or 0")


def _env_names(name: str) -> tuple[str, ...] | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    if not names:
        raise InputError(f"environment variable {name} lists no model; unset it to allow any")
    return names


@dataclass(frozen=True)
class Settings:
    """Every KVVIZ_* environment variable of a deployment (README, "Deployment settings")."""

    default_model: str  # KVVIZ_DEFAULT_MODEL: the model a new visitor starts with
    allowed_models: tuple[str, ...] | None  # KVVIZ_ALLOWED_MODELS: the only models and configs read; None = any
    max_prompt_tokens: int  # KVVIZ_MAX_PROMPT_TOKENS
    max_new_tokens: int  # KVVIZ_MAX_NEW_TOKENS: decode steps per run
    max_trace_mb: int  # KVVIZ_MAX_TRACE_MB: the recorded arrays of one run
    max_total_trace_mb: int  # KVVIZ_MAX_TOTAL_TRACE_MB: of all runs alive in the process
    max_export_mb: int  # KVVIZ_MAX_EXPORT_MB: one downloaded or written trace file
    model_workers: int  # KVVIZ_MODEL_WORKERS: forwards at once (the fair queue's width)
    queue_size: int  # KVVIZ_QUEUE_SIZE: visitors that may wait for the model; more are told to retry
    allow_pickle: bool  # KVVIZ_ALLOW_PICKLE: also load non-safetensors weights (they can run code)

    @property
    def start_model(self) -> str:
        """The model a new visitor gets: the default if allowed, else the first allowed one."""
        if self.allowed_models is None or self.default_model in self.allowed_models:
            return self.default_model
        return self.allowed_models[0]


def settings() -> Settings:
    """The deployment's settings, read from the environment now (tests change it) and checked.

    Raises InputError naming the variable to fix; the app shows it once at the top of every page
    and runs nothing else, the CLI prints it and exits 2.
    """
    return Settings(
        default_model=os.environ.get("KVVIZ_DEFAULT_MODEL", "").strip() or "bundled",
        allowed_models=_env_names("KVVIZ_ALLOWED_MODELS"),
        max_prompt_tokens=_env_int("KVVIZ_MAX_PROMPT_TOKENS", 512, 1, 1_000_000),
        max_new_tokens=_env_int("KVVIZ_MAX_NEW_TOKENS", 256, 1, 100_000),
        max_trace_mb=_env_int("KVVIZ_MAX_TRACE_MB", 256, 1, 1_000_000),
        max_total_trace_mb=_env_int("KVVIZ_MAX_TOTAL_TRACE_MB", 4096, 1, 10_000_000),
        max_export_mb=_env_int("KVVIZ_MAX_EXPORT_MB", 64, 1, 100_000),
        model_workers=_env_int("KVVIZ_MODEL_WORKERS", 1, 1, 256),
        queue_size=_env_int("KVVIZ_QUEUE_SIZE", 64, 1, 100_000),
        allow_pickle=_env_flag("KVVIZ_ALLOW_PICKLE"),
    )
