"""Train kvviz's bundled model: a small Llama (GQA + RoPE) on Jane Austen, on a CPU budget.

The recipe is the usual small-GPT one (nanoGPT, Karpathy 2022; Llama architecture from
Touvron et al. 2023; grouped-query attention from Ainslie et al. 2023, "GQA"), with two
additions that give a learner something to see in the attention (issue 13, model v2):

* **BOS first, always.** Every training sequence starts with ``<|bos|>`` and the tokenizer
  adds it to every prompt (``add_bos_token=True``), as Llama's does. A token that is always
  there and always at position 0 is where trained models park attention they do not need:
  the *attention sink* (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
  Sinks"), which is what makes StreamingLLM's "keep the first tokens" work.
* **Repeated spans.** A share of the sequences contains a span seen twice: ``random_repeat``
  of them a run of random tokens R (the first copy is not scored: it is noise), placed as
  ``[BOS] text R R text``; ``text_repeat`` of them a span of the text copied further on. Only
  a repeat can be predicted by copying, so these train *induction heads* (Olsson et al. 2022,
  "In-context Learning and Induction Heads") within a small budget.

The rest:
* data: the committed corpus ``data/austen/{train,valid}.txt.gz`` (see ``prepare_data.py``);
  only the train split is trained on. Each novel's training paragraphs are joined by "\\n",
  tokenized, and the novels concatenated with ``<|endoftext|>`` between them into one stream.
  A text sequence is ``<|bos|>`` + ``seq_len`` tokens from the start of a random paragraph
  (probability ``para_start``) or from a random offset.
* optimiser: AdamW (betas 0.9/0.95, weight decay on matrices only), linear warmup, then
  cosine decay to ``min_lr_ratio * lr`` over a fixed number of **steps**: the run length is a
  step budget, and with the seed it fixes init, every batch and every dropout mask, so a run
  reproduces (up to float summation order across thread counts).
* regularisation: residual dropout (on the attention and MLP outputs, added with forward
  hooks during training only, so the saved model is a plain ``LlamaForCausalLM``), because
  the budget covers the ~0.95M training tokens about ten times.
* precision: bfloat16 autocast (fp32 master weights) when ``--bf16`` (the default): on these
  CPUs (AMX) it is ~1.5x faster than fp32. The checkpoint is saved in float16.

Every ``--save-every`` steps the full training state (weights, optimiser, RNG states, step)
goes to ``--state`` and an fp16 model to ``--out``; ``--resume`` continues from the state, so
a stopped run picks up where it was and ends as if it had never stopped.
At the end, held-out bits/char on the full validation split is computed and logged.

Continued training and dense copying (what issue 13's runs measured on this 2-core CPU):
* From scratch, 6 layers did not learn to copy within 1,000+ steps, with 12-40% of sequences
  carrying a repeated span: the second copy's loss stayed at ln(vocab) (the induction plateau).
* ``--init DIR`` starts from a saved model (v1 is ``kvviz/bundled``) on the same vocabulary; ``--copy-batch N`` adds N
  rows of ``[BOS] R R R ...`` (|R| random in [min_span, max_span / 2]) to every step, scored
  beside the text batch. With ``--copy-batch 32 --copy-len 64`` from v1, induction heads formed
  between steps 300 and 400 (random-repeat second-copy loss 8.3 -> 0.08 nats; induction score
  0.94 at L3H3 by step 900), but held-out bits/char was 1.387 on the quick slice (v1: 1.365) and no
  sink head appeared (max 0.06): not yet a replacement for v1.

Run (that experiment; ~2.7 s/step on two threads; ``--resume`` continues a stopped run):
    python -m kvviz.training.train --init kvviz/bundled --out artifacts/bundled-v2f \
        --state artifacts/train-v2f.pt --steps 1500 --lr 1e-3 --warmup-steps 30 --no-bf16 --dropout 0.1 \
        --random-repeat 0.25 --text-repeat 0.15 --min-span 8 --max-span 64 --copy-batch 32 --copy-len 64 --resume
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
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from kvviz.training.metrics import bits_per_char, token_nll
from kvviz.training.prepare_data import DATA_DIR, REPO_ROOT, load_split_by_novel
from kvviz.training.tokenizer import save_tokenizer, train_tokenizer


@dataclass
class ModelSpec:
    """Architecture of the bundled Llama (fp16 size must stay under 12 MB)."""

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


IGNORE = -100  # target id that cross_entropy skips (the first copy of a random repeat)


@dataclass(frozen=True)
class Mix:
    """What a training sequence is made of (probabilities per sequence)."""

    random_repeat: float = 0.12  # [BOS] text R R text, R random tokens, its first copy unscored
    text_repeat: float = 0.08  # [BOS] text with one span of it copied further on
    para_start: float = 0.7  # of the plain text sequences: start at a paragraph, else anywhere
    min_span: int = 8  # length of a repeated span, in tokens
    max_span: int = 64


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
        self.first_regular = max(tokenizer.all_special_ids) + 1  # random tokens are never special
        self.vocab_size = len(tokenizer)

    def text(self, rng: random.Random, length: int, para_start: float) -> torch.Tensor:
        """``length`` consecutive tokens from a paragraph start or a random offset: (length,)."""
        n = len(self.ids)
        if rng.random() < para_start:
            start = min(rng.choice(self.paragraph_starts), n - length)
        else:
            start = rng.randrange(0, n - length)
        return self.ids[start : start + length]

    def sequence(self, rng: random.Random, seq_len: int, mix: Mix) -> tuple[torch.Tensor, torch.Tensor]:
        """One row: ``(ids, targets)``, each (seq_len + 1,); ids[0] is BOS; targets are the ids
        with the unpredictable positions set to IGNORE (targets[0] is never used)."""
        kind = rng.random()
        if kind < mix.random_repeat:
            span = rng.randint(mix.min_span, mix.max_span)
            before = rng.randint(0, seq_len - 2 * span)
            r = torch.tensor([rng.randrange(self.first_regular, self.vocab_size) for _ in range(span)])
            after = seq_len - before - 2 * span
            ids = torch.cat([torch.tensor([self.bos_id]), self.text(rng, before, mix.para_start), r, r,
                             self.text(rng, after, 1.0)])
            targets = ids.clone()
            # the first copy, and the first token of the second (what follows R's end is unknowable)
            targets[1 + before : 1 + before + span + 1] = IGNORE
            return ids, targets
        ids = torch.cat([torch.tensor([self.bos_id]), self.text(rng, seq_len, mix.para_start)])
        if kind < mix.random_repeat + mix.text_repeat:
            span = rng.randint(mix.min_span, mix.max_span)
            src = rng.randint(1, seq_len // 2 - span)
            dst = rng.randint(src + span + 1, seq_len + 1 - span)
            ids = ids.clone()
            ids[dst : dst + span] = ids[src : src + span]
        return ids, ids.clone()

    def copy_batch(self, rng: random.Random, batch_size: int, seq_len: int, mix: Mix) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[BOS] R R R ...`` cut at ``seq_len + 1`` tokens, R random tokens of a random length
        in [min_span, max_span / 2] (at least two copies fit); each row's first copy unscored.
        Shapes as ``batch``. Dense copying: every scored token is predictable only by looking back."""
        ids = torch.empty(batch_size, seq_len + 1, dtype=torch.long)
        targets = torch.empty_like(ids)
        for row in range(batch_size):
            span = rng.randint(mix.min_span, max(mix.min_span, min(mix.max_span // 2, seq_len // 2)))
            r = torch.tensor([rng.randrange(self.first_regular, self.vocab_size) for _ in range(span)])
            ids[row] = torch.cat([torch.tensor([self.bos_id]), r.repeat(seq_len // span + 1)])[: seq_len + 1]
            targets[row] = ids[row]
            targets[row, : 1 + span + 1] = IGNORE  # BOS, the first copy, the first token after it
        return ids, targets

    def batch(self, rng: random.Random, batch_size: int, seq_len: int, mix: Mix) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, targets)``, each ``(batch_size, seq_len + 1)``: inputs ``ids[:, :-1]``, targets ``targets[:, 1:]``."""
        rows = [self.sequence(rng, seq_len, mix) for _ in range(batch_size)]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


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


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``min_lr_ratio * lr`` at ``total_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
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


def save_state(path: Path, model: LlamaForCausalLM, opt: torch.optim.Optimizer, rng: random.Random, progress: dict) -> None:
    """Everything a resumed run needs to continue as if it had never stopped (atomic replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng.getstate(),
         "torch_rng": torch.get_rng_state(), "progress": progress},
        tmp,
    )
    tmp.replace(path)


def init_weights(path: Path, tokenizer: PreTrainedTokenizerBase, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """The fp32 state dict of the model saved at ``path``, checked to fit ``config`` and ``tokenizer``.

    Continued training (v2 starts from v1) only makes sense on the same token ids, so a changed
    vocabulary or shape is an error rather than a silent partial load."""
    saved = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    same_vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"] == tokenizer.get_vocab()
    shape = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")
    if not same_vocab or any(getattr(saved.config, k) != getattr(config, k) for k in shape):
        raise SystemExit(f"--init {path}: its vocabulary or shape differs from this run's; train from scratch instead")
    return saved.state_dict()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the bundled Austen Llama on a step budget.")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "artifacts" / "bundled-v2")
    ap.add_argument("--state", type=Path, default=None, help="training-state file (default: OUT/../train-state-OUTNAME.pt)")
    ap.add_argument("--resume", action="store_true", help="continue from --state if it exists")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from this saved model's weights (same tokenizer and shape) instead of random ones",
    )
    ap.add_argument("--steps", type=int, default=3000, help="optimiser steps: the run length")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
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
    ap.add_argument("--random-repeat", type=float, default=Mix.random_repeat)
    ap.add_argument("--text-repeat", type=float, default=Mix.text_repeat)
    ap.add_argument("--min-span", type=int, default=Mix.min_span, help="shortest repeated span, tokens")
    ap.add_argument("--max-span", type=int, default=Mix.max_span, help="longest repeated span, tokens")
    ap.add_argument("--copy-batch", type=int, default=0, help="rows of pure copying ([BOS] R R ...) added to every step")
    ap.add_argument("--copy-len", type=int, default=64, help="tokens per copying row")
    ap.add_argument("--text-weight", type=float, default=1.0,
                    help="weight of the text batch's loss; 0 skips it (a copying-only stage)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden-size", type=int, default=ModelSpec.hidden_size)
    ap.add_argument("--layers", type=int, default=ModelSpec.num_hidden_layers)
    ap.add_argument("--heads", type=int, default=ModelSpec.num_attention_heads)
    ap.add_argument("--kv-heads", type=int, default=ModelSpec.num_key_value_heads)
    ap.add_argument("--intermediate-size", type=int, default=ModelSpec.intermediate_size)
    ap.add_argument("--save-every", type=int, default=200, help="steps between checkpoints")
    ap.add_argument(
        "--quick-eval-tokens",
        type=int,
        default=8192,
        help="validation tokens per novel scored at each checkpoint (progress only)",
    )
    args = ap.parse_args(argv)
    state_path = args.state or args.out.parent / f"train-state-{args.out.name}.pt"

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    mix = Mix(random_repeat=args.random_repeat, text_repeat=args.text_repeat, min_span=args.min_span, max_span=args.max_span)
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
    if args.init is not None:
        model.load_state_dict(init_weights(args.init, tokenizer, config))
    model.config._attn_implementation = "sdpa"  # fastest for training; eval re-loads as needed
    add_residual_dropout(model, args.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train tokens {len(stream.ids):,}  params {n_params:,}  spec {asdict(spec)}  mix {asdict(mix)}", flush=True)

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

    progress: dict = {"step": 0, "tokens": 0, "seconds": 0.0, "loss_ema": None, "history": []}
    if args.resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)  # our own file, written by save_state
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        progress = state["progress"]
        print(f"resumed from {state_path} at step {progress['step']}", flush=True)

    def info(status: str) -> dict:
        return {
            "status": status,
            "steps": progress["step"],
            "tokens_seen": progress["tokens"],
            "epochs": round(progress["tokens"] / len(stream.ids), 2),
            "seconds": round(progress["seconds"]),
            "params": n_params,
            "train_loss_ema": None if progress["loss_ema"] is None else round(progress["loss_ema"], 4),
            "mix": asdict(mix),
            "device": args.device,
            "threads": args.threads,
            "torch": torch.__version__,
            "args": _jsonable(vars(args)),
            "history": progress["history"],
        }

    model.train()
    t_run = time.time() - progress["seconds"]
    while progress["step"] < args.steps:
        step = progress["step"]
        lr = lr_at(step, args.steps, args.lr, args.warmup_steps, args.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        ids, targets = stream.batch(rng, args.batch_size, args.seq_len, mix)
        ids, targets = ids.to(args.device), targets.to(args.device)
        loss = torch.zeros((), device=args.device)
        if args.text_weight > 0:
            with torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(input_ids=ids[:, :-1]).logits  # (B, T, vocab)
            loss = args.text_weight * F.cross_entropy(logits.float().flatten(0, 1), targets[:, 1:].flatten(),
                                                      ignore_index=IGNORE)
        if args.copy_batch:
            # its own (shorter) batch: copying needs many examples per step to leave the plateau
            c_ids, c_targets = stream.copy_batch(rng, args.copy_batch, args.copy_len, mix)
            with torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16):
                c_logits = model(input_ids=c_ids[:, :-1].to(args.device)).logits
            c_loss = F.cross_entropy(c_logits.float().flatten(0, 1), c_targets[:, 1:].flatten().to(args.device),
                                     ignore_index=IGNORE)
            loss = loss + c_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        progress["step"] = step = step + 1
        progress["tokens"] += int((targets[:, 1:] != IGNORE).sum()) if args.text_weight > 0 else 0
        progress["seconds"] = time.time() - t_run
        ema = progress["loss_ema"]
        progress["loss_ema"] = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 20 == 0:
            print(f"step {step}/{args.steps} loss {progress['loss_ema']:.3f} lr {lr:.2e} "
                  f"tok/s {progress['tokens'] / progress['seconds']:.0f}", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            val = quick_eval()
            progress["history"].append({
                "seconds": round(progress["seconds"]), "step": step, "tokens": progress["tokens"],
                "train_loss_ema": round(progress["loss_ema"], 4), "quick_valid_nats_per_token": round(val, 4),
            })
            print(json.dumps(progress["history"][-1]), flush=True)
            save_checkpoint(model, tokenizer, args.out, info("in progress"))
            save_state(state_path, model, opt, rng, progress)

    model.eval()
    t_eval = time.time()
    final = bits_per_char(model, tokenizer, valid_texts, context=args.seq_len, stride=args.seq_len // 2, device=args.device)
    done = info("done")
    done["valid_fp32_weights"] = final
    save_checkpoint(model, tokenizer, args.out, done)
    print(
        f"done: {progress['step']} steps, {progress['tokens']:,} tokens in {progress['seconds'] / 60:.1f} min; held-out "
        f"{final['bits_per_char']:.4f} bits/char ({final['nats_per_token']:.4f} nats/token, "
        f"eval {time.time() - t_eval:.0f}s); saved to {args.out}",
        flush=True,
    )


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


if __name__ == "__main__":
    main()
