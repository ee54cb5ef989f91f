"""A model's config.json read strictly, and its parameter count by arithmetic (no torch, nothing built).

A config comes from anyone: an upload, a typed path, a checkpoint folder, the hub. Before any of
its numbers reaches transformers (whose config classes divide by the head count in `__init__`)
or an allocation, it is checked here:
- the file: at most `MAX_CONFIG_BYTES`, UTF-8, strict JSON (no NaN/Infinity, no 1e400), nested at
  most `MAX_DEPTH` deep (a 100k-deep file made `json` raise RecursionError), an object;
- the fields kvviz reads (layers, heads, KV heads, hidden size, head_dim, context, vocab, MLP and
  expert sizes): whole numbers within `BOUNDS` (a 1e6-layer config is refused at once, not built),
  KV heads dividing the query heads.

`parameter_count` then counts the weights by arithmetic from those bounded fields: exact for the
families kvviz tests (Llama, Mistral, Qwen2, Gemma, GPT-2, OPT, Falcon, Phi; checked in tests
against building the model on the meta device), an estimate for others (mixture-of-experts and
unusual layers are approximated). Building layers on the meta device, as before, took a minute
for the shipped presets and 3 GiB for a config with a million layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvviz.validate import InputError, whole_number

MAX_CONFIG_BYTES = 2**20  # real config.json files are a few KB; the upload limit is 1 MB too
MAX_DEPTH = 32  # real configs nest 2-4 deep (text_config, rope_scaling)

# name -> (smallest, largest): far beyond every published model, far below what would hurt
BOUNDS: dict[str, tuple[int, int]] = {
    "layers": (1, 1024),
    "heads": (1, 1024),
    "kv_heads": (1, 1024),
    "hidden": (1, 131_072),
    "embed_dim": (1, 131_072),
    "head_dim": (1, 16_384),
    "positions": (0, 2**27),
    "vocab": (1, 2**22),
    "intermediate": (1, 2**20),
    "experts": (0, 1024),
    "shared_experts": (0, 64),
    "dense_layers": (0, 1024),
}
# which config keys hold each number (the families' different names, as in geometry.kv_geometry)
FIELDS: dict[str, tuple[str, ...]] = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"),
    "hidden": ("hidden_size", "n_embd", "d_model", "dim"),
    "embed_dim": ("word_embed_proj_dim",),
    "head_dim": ("head_dim",),
    "positions": ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_seq_len"),
    "vocab": ("vocab_size",),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "moe_intermediate_size",
                     "shared_expert_intermediate_size"),
    "experts": ("num_local_experts", "num_experts", "n_routed_experts"),
    "shared_experts": ("n_shared_experts",),
    "dense_layers": ("first_k_dense_replace",),
}


# -- reading ---------------------------------------------------------------------------------------
def _refuse_constant(name: str) -> None:
    raise InputError(f"it contains {name}, which is not JSON")


def _finite_float(text: str) -> float:
    x = float(text)
    if x in (float("inf"), float("-inf")):
        raise InputError(f"it contains {text[:20]}, too large for a number")
    return x


def depth(obj: Any) -> int:
    """How deeply lists and dicts nest in parsed JSON (iterative: no recursion to exhaust)."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        node, d = todo.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                break
            todo.extend((child, d + 1) for child in node)
    return deepest


def parse_config_json(data: str | bytes, source: str = "the uploaded file") -> dict[str, Any]:
    """config.json text (an upload, a file) as a checked dict; InputError saying what is wrong."""
    size = len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    if size > MAX_CONFIG_BYTES:
        raise InputError(f"{source} is {size / 2**20:.1f} MiB; a config.json is a few KB (limit 1 MiB)")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        cfg = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except InputError as e:
        raise InputError(f"{source} is not valid JSON: {e}") from None
    except RecursionError:
        raise InputError(f"{source} nests too deeply to be a config.json") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, a 5000-digit integer, bad bytes
        raise InputError(f"{source} is not valid JSON ({str(e).splitlines()[0][:80]}): upload the model's config.json") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{source} is JSON but not an object: upload the model's config.json")
    if depth(cfg) > MAX_DEPTH:
        raise InputError(f"{source} nests more than {MAX_DEPTH} levels deep: not a model's config.json")
    return check_config(cfg, source)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config.json (or a directory holding one) as a checked dict; InputError saying what is wrong."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise InputError(f"no config.json at {str(path)!r}: pass a config.json file or a checkpoint directory")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise InputError(f"{p.name} is {p.stat().st_size / 2**20:.1f} MiB; a config.json is a few KB (limit 1 MiB)")
    return parse_config_json(p.read_bytes(), source=str(p))


# -- checking ----------------------------------------------------------------------------------------
def text_part(cfg: dict[str, Any]) -> dict[str, Any]:
    """The decoder's own fields: multimodal configs keep them in `text_config` (as geometry reads them)."""
    inner = cfg.get("text_config")
    if isinstance(inner, dict) and "num_hidden_layers" not in cfg:
        return {**inner, "model_type": cfg.get("model_type", inner.get("model_type"))}
    return cfg


def _number(cfg: dict[str, Any], kind: str, source: str) -> int | None:
    """The first of `kind`'s keys that is set, checked; None when the config sets none."""
    lo, hi = BOUNDS[kind]
    found = None
    for key in FIELDS[kind]:
        if cfg.get(key) is None:
            continue
        value = whole_number(cfg[key], f"{key} in {source}", lo, hi)
        found = value if found is None else found
    return found


def check_config(cfg: dict[str, Any], source: str = "the config") -> dict[str, Any]:
    """Refuse a config whose numbers are not bounded whole numbers that fit together. Returns it."""
    for part in (cfg, text_part(cfg)):
        numbers = {kind: _number(part, kind, source) for kind in FIELDS}
        heads, kv = numbers["heads"], numbers["kv_heads"]
        if heads is not None and kv is not None and not part.get("multi_query") and (kv > heads or heads % kv):
            raise InputError(f"{kv} KV heads do not divide {heads} query heads in {source}: "
                             "each KV head serves a whole group of query heads")
        for flag in ("multi_query", "new_decoder_architecture", "tie_word_embeddings"):
            if part.get(flag) is not None and not isinstance(part[flag], bool):
                raise InputError(f"{flag} in {source} must be true or false, got {str(part[flag])[:40]}")
        if part.get("model_type") is not None and not isinstance(part["model_type"], str):
            raise InputError(f"model_type in {source} must be a string")
    return cfg


# -- counting ----------------------------------------------------------------------------------------
# families that differ from the Llama layout (gated MLP, RMSNorm, no biases, untied head)
_LAYERNORM = {"gpt2", "opt", "falcon", "phi", "gpt_neox", "bloom", "gpt_bigcode", "gptj", "codegen", "gpt_neo",
              "starcoder2", "stablelm"}
_PLAIN_MLP = {"gpt2", "opt", "falcon", "phi", "gpt_neox", "bloom", "gpt_bigcode", "gptj", "codegen", "gpt_neo",
              "starcoder2"}
_ALL_BIASES = {"gpt2", "opt", "phi", "gpt_neox", "bloom", "gpt_bigcode", "starcoder2"}
_QKV_BIAS = {"qwen2", "qwen2_moe"}
_TIED = {"gpt2", "opt", "falcon", "gemma", "gemma2", "gemma3_text", "gpt_bigcode", "bloom", "gpt_neo"}
_LEARNED_POSITIONS = {"gpt2": 0, "gpt_bigcode": 0, "gpt_neo": 0, "opt": 2, "biogpt": 2}  # extra rows (OPT's offset)


def parameter_count(cfg: dict[str, Any]) -> int:
    """Parameters of the model a checked config describes, by arithmetic (tied embeddings once).

    Raises InputError when the config does not say its layers, heads and hidden size.
    """
    c = text_part(check_config(cfg))
    n = {kind: _number(c, kind, "the config") for kind in FIELDS}
    if n["layers"] is None or n["heads"] is None or n["hidden"] is None:
        raise InputError("the config does not say its number of layers, heads and hidden size")
    mt = str(c.get("model_type", ""))
    layers, heads, d = n["layers"], n["heads"], n["hidden"]
    hd = n["head_dim"] or d // heads
    kv = 1 if c.get("multi_query") and not c.get("new_decoder_architecture") else (n["kv_heads"] or heads)
    vocab = n["vocab"] or 0
    inter = _first_int(c, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size") or 4 * d
    biased = mt in _ALL_BIASES or bool(c.get("bias")) or bool(c.get("attention_bias"))
    norm = 2 * d if mt in _LAYERNORM else d  # LayerNorm has a weight and a bias, RMSNorm a weight

    attn = d * heads * hd + 2 * d * kv * hd + heads * hd * d  # q, k, v, o
    if biased or mt in _QKV_BIAS:
        attn += heads * hd + 2 * kv * hd + (d if biased else 0)

    def mlp(width: int, gated: bool, bias: bool) -> int:
        weights = (3 if gated else 2) * d * width
        return weights + ((2 * width if gated else width) + d if bias else 0)

    gated = mt not in _PLAIN_MLP
    mlp_bias = mt in _ALL_BIASES or bool(c.get("mlp_bias"))
    dense_mlp = mlp(inter, gated, mlp_bias)
    experts = n["experts"] or 0
    if experts:
        width = _first_int(c, "moe_intermediate_size") or inter
        shared = _first_int(c, "shared_expert_intermediate_size") or (n["shared_experts"] or 0) * width
        moe_mlp = experts * mlp(width, True, False) + d * experts + (mlp(shared, True, False) if shared else 0)
        dense_layers = min(layers, n["dense_layers"] or 0)
        mlps = dense_layers * dense_mlp + (layers - dense_layers) * moe_mlp
    else:
        mlps = layers * dense_mlp

    norms_per_layer = 2
    if mt == "falcon":
        norms_per_layer = int(c.get("num_ln_in_parallel_attn") or 2) if c.get("new_decoder_architecture") else 1
    elif mt == "phi":
        norms_per_layer = 1
    elif mt in ("gemma2", "gemma3_text"):
        norms_per_layer = 4

    embed_dim = n["embed_dim"] or d  # OPT-350m embeds smaller, then projects
    embeddings = vocab * embed_dim + (2 * d * embed_dim if embed_dim != d else 0)
    if mt in _LEARNED_POSITIONS:
        embeddings += ((n["positions"] or 0) + _LEARNED_POSITIONS[mt]) * d
    tied = c.get("tie_word_embeddings")
    tied = mt in _TIED if tied is None else tied
    head = 0 if tied else vocab * embed_dim + (vocab if mt == "phi" else 0)
    return layers * (attn + norms_per_layer * norm) + mlps + norm + embeddings + head


def _first_int(c: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = c.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
