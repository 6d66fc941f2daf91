"""Train the embedded default model: a small Llama with a ReLU-gated FFN, h = relu(W_gate x) * (W_up x),
and an L1 penalty on relu(W_gate x) that drives FFN activations sparse.

The penalty is the mean over layers of the per-token sum of relu(gate), times a coefficient ramped
linearly from 0 over the first half of training (ProSparse-style ramp). `--l1 0` trains the baseline.
Exports a Hugging Face directory (config.json, model.safetensors, tokenizer.json) that
`edge-runtime convert` packs; nothing in the runtime knows about this model.

`--drelu` trains a dReLU model instead (TurboSparse: h = relu(W_gate x) * relu(W_up x)), exported with
config.json "hidden_act": "drelu", the marker `convert` reads.

Example (the shipped model):
  python scripts/train_default_model.py --corpus ../shared/corpora/gutenberg --holdout carroll-alice.txt \
      --out runs/l1 --l1 3e-3 --steps 1200 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from corpus_text import chunks  # scripts/ is on sys.path when this file runs as a script
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from edge_runtime.cli_args import description

try:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:
    raise SystemExit("train_default_model.py: error: needs torch and transformers: pip install '.[train]'") from None


def train_tokenizer(texts: list[str], vocab: int) -> Tokenizer:
    """Byte-level BPE. Training wraps chunks as <s> ... </s>; the exported tokenizer.json only prepends
    <s> (a prompt is an unfinished document)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator([c for t in texts for c in chunks(t)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return tok


def encode_corpus(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """<s> chunk </s> for every chunk of every book, concatenated into one uint16 stream."""
    ids: list[int] = []
    for text in texts:
        for enc in tok.encode_batch(chunks(text)):
            ids.extend(enc.ids)  # the post-processor adds <s> ... </s>
    return np.asarray(ids, dtype=np.uint16)


class DReLUMLP(torch.nn.Module):
    """A Llama MLP's own projections computing down(relu(gate x) * relu(up x)); act_fn kept for the hooks."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = (inner.gate_proj, inner.up_proj,
                                                                      inner.down_proj, inner.act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * torch.relu(self.up_proj(x)))


def relu_hooks(model: LlamaForCausalLM, store: list[torch.Tensor]) -> None:
    """Collect relu(W_gate x) of every layer (the act_fn module's output) on each forward."""
    for layer in model.model.layers:
        layer.mlp.act_fn.register_forward_hook(lambda _m, _i, out: store.append(out))


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, data: np.ndarray, seq: int, max_windows: int = 64) -> tuple[float, float]:
    """Perplexity and mean FFN activation sparsity over non-overlapping windows of held-out text."""
    model.eval()
    acts: list[torch.Tensor] = []
    handles = [layer.mlp.act_fn.register_forward_hook(lambda _m, _i, out: acts.append(out))
               for layer in model.model.layers]
    nll, count, zeros, total = 0.0, 0, 0, 0
    n = min(max_windows, (len(data) - 1) // seq)
    for w in range(n):
        chunk = torch.from_numpy(data[w * seq:(w + 1) * seq + 1].astype(np.int64))[None]
        out = model(chunk[:, :-1], labels=chunk[:, 1:].clone(), use_cache=False)
        logits = out.logits[0]
        nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += seq
        for a in acts:
            zeros += (a == 0).sum().item()
            total += a.numel()
        acts.clear()
    for h in handles:
        h.remove()
    model.train()
    return math.exp(nll / count), zeros / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--corpus", type=Path, required=True, help="folder of .txt books")
    ap.add_argument("--holdout", default="carroll-alice.txt", help="book never trained on")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, help="reuse this tokenizer.json (the baseline shares it)")
    ap.add_argument("--save-tokenizer", type=Path, help="write the trained tokenizer here and exit")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--l1", type=float, default=3e-3, help="L1 coefficient (0 = baseline)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--drelu", action="store_true", help="dReLU FFN: relu on up as well (TurboSparse)")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    books = sorted(p for p in args.corpus.glob("*.txt") if p.name != args.holdout)
    train_texts = [p.read_text(encoding="utf-8") for p in books]
    holdout_text = (args.corpus / args.holdout).read_text(encoding="utf-8")
    tok = Tokenizer.from_file(str(args.tokenizer)) if args.tokenizer else train_tokenizer(train_texts, args.vocab)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    if args.save_tokenizer:
        tok.save(str(args.save_tokenizer))
        return
    train = encode_corpus(tok, train_texts)
    held = encode_corpus(tok, [holdout_text])
    print(f"train tokens {len(train):,} from {len(books)} books; held-out tokens {len(held):,} ({args.holdout})")

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.dim, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=512, hidden_act="relu", tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
    model = LlamaForCausalLM(config)
    if args.drelu:
        for layer in model.model.layers:
            layer.mlp = DReLUMLP(layer.mlp)
    acts: list[torch.Tensor] = []
    relu_hooks(model, acts)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(args.steps // 20, 1)
    log = []
    t0 = time.time()
    for step in range(args.steps):
        lr = args.lr * min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = rng.integers(0, len(train) - args.seq - 1, size=args.batch)
        batch = torch.from_numpy(np.stack([train[s:s + args.seq + 1] for s in starts]).astype(np.int64))
        acts.clear()
        out = model(batch[:, :-1], labels=batch[:, 1:].clone(), use_cache=False)
        ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, config.vocab_size),
                                               batch[:, 1:].reshape(-1))
        # mean over layers of the per-token sum of relu(gate)
        l1 = torch.stack([a.sum(-1).mean() for a in acts]).mean()
        coef = args.l1 * min(1.0, step / (args.steps / 2))
        loss = ce + coef * l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        zero_frac = float(np.mean([(a == 0).float().mean().item() for a in acts]))
        log.append({"step": step, "ce": ce.item(), "l1": l1.item(), "coef": coef, "sparsity": zero_frac,
                    "lr": lr, "elapsed_s": time.time() - t0})
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d} ce {ce.item():.3f} l1 {l1.item():.2f} sparsity {zero_frac:.3f} "
                  f"lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            ppl, sp = evaluate(model, held, args.seq)
            log[-1].update({"heldout_ppl": ppl, "heldout_sparsity": sp})
            print(f"  held-out ppl {ppl:.2f} sparsity {sp:.4f}", flush=True)
    ppl, sp = evaluate(model, held, args.seq, max_windows=256)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    if args.drelu:
        conf = json.loads((args.out / "config.json").read_text())
        conf["hidden_act"] = "drelu"
        (args.out / "config.json").write_text(json.dumps(conf, indent=2))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(args.out / "tokenizer.json"))
    summary = {"heldout_ppl": ppl, "heldout_sparsity": sp, "train_tokens": int(len(train)),
               "tokens_seen": args.steps * args.batch * args.seq, "seconds": time.time() - t0,
               "args": {k: str(v) for k, v in vars(args).items()}}
    (args.out / "train_log.json").write_text(json.dumps({"summary": summary, "log": log}))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
