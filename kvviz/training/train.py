"""Train kvviz's bundled model: a small Llama (GQA + RoPE) on Jane Austen, on a CPU budget.

The recipe is the usual small-GPT one (nanoGPT, Karpathy 2022; Llama architecture from
Touvron et al. 2023; grouped-query attention from Ainslie et al. 2023, "GQA"):

* data: the committed corpus ``data/austen/{train,valid}.txt.gz`` (see ``prepare_data.py``);
  only the train split is trained on. Each novel's training paragraphs are joined by "\\n",
  tokenized, and the novels concatenated with ``<|endoftext|>`` between them into one stream.
* batches: ``batch_size`` sequences of ``seq_len`` tokens. With probability ``bos_prob`` a
  sequence is ``<|bos|>`` + text from the start of a random paragraph; otherwise it is text
  from a uniformly random offset. So the model works both with and without a BOS in front
  (kvviz's tokenizer does not add one) and BOS, when present, marks a paragraph start.
* optimiser: AdamW (betas 0.9/0.95, weight decay on matrices only), linear warmup, then
  cosine decay to ``min_lr_ratio * lr`` over the *wall-clock* budget: the schedule is a
  function of elapsed time, so a run of any length ends fully annealed. The step count
  therefore depends on machine speed (the seed fixes init and batch order, not the length).
* regularisation: residual dropout (on the attention and MLP outputs, added with forward
  hooks during training only, so the saved model is a plain ``LlamaForCausalLM``), because
  the budget covers the ~0.9M training tokens about ten times.
* precision: bfloat16 autocast (fp32 master weights) when ``--bf16`` (the default): on these
  CPUs (AMX) it is ~1.5x faster than fp32. The checkpoint is saved in float16.

The model is saved every ``--save-every`` seconds and at the end (fp16 safetensors + tokenizer,
written to a temporary directory then moved in), so stopping the run leaves a loadable model.
At the end, held-out bits/char on the full validation split is computed and logged.

Run (the bundled model; ~40 min on one CPU thread):
    python -m kvviz.training.train --budget-minutes 40 --out kvviz/bundled
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from kvviz.training.metrics import bits_per_char, token_nll
from kvviz.training.prepare_data import DATA_DIR, REPO_ROOT, load_split_by_novel
from kvviz.training.tokenizer import save_tokenizer, train_tokenizer


@dataclass
class ModelSpec:
    """Architecture of the bundled Llama (fp16 size must stay under 10 MB)."""

    vocab_size: int = 4096  # byte-level BPE; ~4.1 characters per token on Austen
    hidden_size: int = 256  # d_model
    num_hidden_layers: int = 6
    num_attention_heads: int = 8  # query heads of head_dim 32
    num_key_value_heads: int = 2  # GQA: 4 query heads share each K/V head
    head_dim: int = 32
    intermediate_size: int = 512  # SwiGLU width; 2x d keeps 6 layers under the size cap
    max_position_embeddings: int = 512  # trained on 256; RoPE extrapolates to 512 for the demo
    rope_theta: float = 10000.0

    def to_config(self, bos_token_id: int, eos_token_id: int) -> LlamaConfig:
        """A ``LlamaConfig`` with tied embeddings and the tokenizer's special ids."""
        return LlamaConfig(
            **asdict(self),
            tie_word_embeddings=True,  # the 4096x256 table is 1M params: share it with the head
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
            attention_dropout=0.0,
            rms_norm_eps=1e-5,
        )


class TokenStream:
    """The training split as one token stream, plus where each paragraph starts in it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, novels: list[tuple[str, list[str]]]):
        ids: list[int] = []
        starts: list[int] = []
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        for _title, paragraphs in novels:
            for p in paragraphs:
                starts.append(len(ids))
                ids += tokenizer(p, add_special_tokens=False)["input_ids"] + newline
            ids.append(tokenizer.eos_token_id)  # novel boundary
        self.ids = torch.tensor(ids, dtype=torch.long)  # (N,)
        self.paragraph_starts = starts
        self.bos_id = tokenizer.bos_token_id

    def batch(self, rng: random.Random, batch_size: int, seq_len: int, bos_prob: float) -> torch.Tensor:
        """``(batch_size, seq_len + 1)`` token ids; inputs are ``[:, :-1]``, targets ``[:, 1:]``."""
        rows = []
        n = len(self.ids)
        for _ in range(batch_size):
            if rng.random() < bos_prob:
                start = min(rng.choice(self.paragraph_starts), n - seq_len)
                row = torch.cat([torch.tensor([self.bos_id]), self.ids[start : start + seq_len]])
            else:
                start = rng.randrange(0, n - seq_len - 1)
                row = self.ids[start : start + seq_len + 1]
            rows.append(row)
        return torch.stack(rows)  # (B, T+1)


def add_residual_dropout(model: LlamaForCausalLM, p: float) -> list[torch.utils.hooks.RemovableHandle]:
    """Dropout on every attention and MLP output (before the residual add), training mode only.

    ``LlamaConfig`` has no residual dropout; hooks add it without changing the saved model.
    """

    def attn_hook(module, _inputs, output):
        return (F.dropout(output[0], p, module.training), *output[1:])

    def mlp_hook(module, _inputs, output):
        return F.dropout(output, p, module.training)

    handles = []
    for layer in model.model.layers:
        handles.append(layer.self_attn.register_forward_hook(attn_hook))
        handles.append(layer.mlp.register_forward_hook(mlp_hook))
    return handles


def lr_at(step: int, elapsed_frac: float, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``min_lr_ratio * lr``
    as the elapsed fraction of the wall-clock budget goes from 0 to 1."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed_frac)))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * cos)


def save_checkpoint(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, out: Path, info: dict) -> None:
    """Save an fp16 copy of ``model`` + tokenizer + ``training.json`` into ``out``.

    Written to ``out/.tmp-save`` first and then moved file by file, so a run killed mid-save
    still leaves the previous complete checkpoint (each ``os.replace`` is atomic).
    """
    tmp = out / ".tmp-save"
    shutil.rmtree(tmp, ignore_errors=True)
    half = copy.deepcopy(model).to(torch.float16).eval()
    half.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    half.save_pretrained(str(tmp), safe_serialization=True)
    save_tokenizer(tokenizer, tmp)
    (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the bundled Austen Llama on a time budget.")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "kvviz" / "bundled")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--budget-minutes", type=float, default=40.0, help="wall-clock training budget")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (leave cores to others)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bfloat16 autocast for forward/backward (fp32 weights)",
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.1, help="residual dropout")
    ap.add_argument("--bos-prob", type=float, default=0.5)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden-size", type=int, default=ModelSpec.hidden_size)
    ap.add_argument("--layers", type=int, default=ModelSpec.num_hidden_layers)
    ap.add_argument("--heads", type=int, default=ModelSpec.num_attention_heads)
    ap.add_argument("--kv-heads", type=int, default=ModelSpec.num_key_value_heads)
    ap.add_argument("--intermediate-size", type=int, default=ModelSpec.intermediate_size)
    ap.add_argument("--save-every", type=float, default=300.0, help="seconds between checkpoints")
    ap.add_argument(
        "--quick-eval-tokens",
        type=int,
        default=8192,
        help="validation tokens per novel scored at each checkpoint (progress only)",
    )
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    train_novels = load_split_by_novel("train", args.data_dir)
    valid_texts = ["\n".join(p) for _t, p in load_split_by_novel("valid", args.data_dir)]
    tokenizer = train_tokenizer((p for _t, ps in train_novels for p in ps), args.vocab_size)
    stream = TokenStream(tokenizer, train_novels)
    valid_ids = [[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"]] for t in valid_texts]

    spec = ModelSpec(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads,
        intermediate_size=args.intermediate_size,
    )
    config = spec.to_config(tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).to(args.device)
    model.config._attn_implementation = "sdpa"  # fastest for training; eval re-loads as needed
    add_residual_dropout(model, args.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train tokens {len(stream.ids):,}  params {n_params:,}  spec {asdict(spec)}", flush=True)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # RMSNorm gains
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    def quick_eval() -> float:
        """Held-out nats/token on the first tokens of each novel (progress signal only)."""
        nll, n = 0.0, 0
        with torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16):
            for ids in valid_ids:
                a, b = token_nll(
                    model, ids, context=args.seq_len, stride=args.seq_len, device=args.device, max_tokens=args.quick_eval_tokens
                )
                nll, n = nll + a, n + b
        return nll / n

    budget = args.budget_minutes * 60.0
    step, tokens_seen, loss_ema = 0, 0, None
    history: list[dict] = []
    info: dict = {}
    t0 = last_save = time.time()
    bar = tqdm(
        total=round(budget),
        unit="s",
        desc="train",
        mininterval=5.0,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}s [{elapsed}<{remaining}{postfix}]",
    )
    model.train()
    while True:
        elapsed = time.time() - t0
        if elapsed >= budget:
            break
        lr = lr_at(step, elapsed / budget, args.lr, args.warmup_steps, args.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = stream.batch(rng, args.batch_size, args.seq_len, args.bos_prob).to(args.device)
        with torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(input_ids=batch[:, :-1]).logits  # (B, T, vocab)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += batch[:, 1:].numel()
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        now = time.time()
        bar.n = min(round(now - t0), bar.total)
        bar.set_postfix(step=step, loss=f"{loss_ema:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_seen / (now - t0):.0f}", refresh=False)
        bar.update(0)
        if now - last_save >= args.save_every:
            val = quick_eval()
            history.append(
                {
                    "seconds": round(now - t0),
                    "step": step,
                    "tokens": tokens_seen,
                    "train_loss_ema": round(loss_ema, 4),
                    "quick_valid_nats_per_token": round(val, 4),
                }
            )
            tqdm.write(json.dumps(history[-1]))
            info = {
                "status": "in progress",
                "steps": step,
                "tokens_seen": tokens_seen,
                "seconds": round(now - t0),
                "params": n_params,
                "args": _jsonable(vars(args)),
                "history": history,
            }
            save_checkpoint(model, tokenizer, args.out, info)
            last_save = time.time()
    bar.close()
    train_seconds = time.time() - t0

    model.eval()
    t_eval = time.time()
    final = bits_per_char(model, tokenizer, valid_texts, context=args.seq_len, stride=args.seq_len // 2, device=args.device)
    info = {
        "status": "done",
        "steps": step,
        "tokens_seen": tokens_seen,
        "epochs": round(tokens_seen / len(stream.ids), 2),
        "seconds": round(train_seconds),
        "params": n_params,
        "train_loss_ema": round(loss_ema or float("nan"), 4),
        "valid_fp32_weights": final,
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
        "args": _jsonable(vars(args)),
        "history": history,
    }
    save_checkpoint(model, tokenizer, args.out, info)
    print(
        f"done: {step} steps, {tokens_seen:,} tokens in {train_seconds / 60:.1f} min; held-out "
        f"{final['bits_per_char']:.4f} bits/char ({final['nats_per_token']:.4f} nats/token, "
        f"eval {time.time() - t_eval:.0f}s); saved to {args.out}",
        flush=True,
    )


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


if __name__ == "__main__":
    main()
