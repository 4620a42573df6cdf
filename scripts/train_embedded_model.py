#!/usr/bin/env python3
"""Train the small Qwen2-style language model that ships embedded in ann2snn.

The project needs a real, trained (not random) Qwen2 checkpoint it can convert
to a spiking network in tests and examples, without any model hub.  This script
produces one from the public-domain English text in ``ann2snn/data/corpus``
(see ``SOURCE.md`` there) and is the exact recipe behind
``ann2snn/data/qwen2-tiny``.

What it does, in order:

1. Trains a byte-level BPE tokenizer (``tokenizers`` library) on ``train.txt``
   with a single special token ``<|endoftext|>`` used as bos/eos/pad, using
   Qwen2's own normalizer and pre-tokenizer, and wraps it as a
   ``transformers.Qwen2Tokenizer`` (what ``AutoTokenizer`` loads for Qwen2).
2. Builds a tiny ``transformers.Qwen2ForCausalLM`` (grouped-query attention,
   SwiGLU MLP, RMSNorm, RoPE, tied embeddings) from a fixed seed.
3. Measures the perplexity of that *randomly initialised* model on
   ``heldout.txt`` (same style as training, never trained on) and
   ``unseen.txt`` (a different book by a different author).
4. Trains it with AdamW and a linear-warmup + cosine learning-rate schedule on
   random 128-token windows of ``train.txt``, single-threaded on the CPU.
5. Measures the same perplexities for the trained model.
6. Saves ``config.json``, ``generation_config.json``, ``model.safetensors``
   (float32) and the tokenizer files into ``--out``, plus ``TRAINING.md``
   (human-readable record) and ``training_metrics.json`` (the same numbers,
   machine-readable).

The result loads offline with::

    from transformers import AutoTokenizer, Qwen2ForCausalLM
    model = Qwen2ForCausalLM.from_pretrained("ann2snn/data/qwen2-tiny")
    tok = AutoTokenizer.from_pretrained("ann2snn/data/qwen2-tiny")

Everything is seeded (``--seed``) and runs on one CPU thread by default, so a
rerun with the same arguments and library versions reproduces the same
weights.  With the defaults it takes about 15-20 minutes on one core of a
2-core cloud VM (longer if the other core is busy and memory bandwidth is shared).

Usage (from the repository root)::

    python scripts/train_embedded_model.py                 # the shipped model
    python scripts/train_embedded_model.py --steps 50 --out /tmp/smoke   # quick smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

# Keep the Rust tokenizer trainer and any BLAS pools single-threaded *before*
# the libraries are imported: determinism, and another process needs the other core.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT / "ann2snn" / "data" / "corpus"
DEFAULT_OUT = REPO_ROOT / "ann2snn" / "data" / "qwen2-tiny"
EOT = "<|endoftext|>"
# Qwen2's pre-tokenizer split pattern (as in transformers' Qwen2Tokenizer / Qwen2's tokenizer.json).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


# --------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("input/output")
    io.add_argument("--corpus-dir", type=Path, default=DEFAULT_CORPUS,
                    help="folder with train.txt, heldout.txt and unseen.txt")
    io.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model folder")

    tk = p.add_argument_group("tokenizer")
    tk.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size (incl. special token)")

    m = p.add_argument_group("model (Qwen2Config)")
    m.add_argument("--hidden-size", type=int, default=128)
    m.add_argument("--num-layers", type=int, default=4)
    m.add_argument("--num-heads", type=int, default=4)
    m.add_argument("--num-kv-heads", type=int, default=2, help="< --num-heads gives grouped-query attention")
    m.add_argument("--head-dim", type=int, default=32)
    m.add_argument("--intermediate-size", type=int, default=384, help="SwiGLU MLP width (~3x hidden)")
    m.add_argument("--max-position-embeddings", type=int, default=512)
    m.add_argument("--rope-theta", type=float, default=10000.0)

    t = p.add_argument_group("training")
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--steps", type=int, default=1100, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    t.add_argument("--seq-len", type=int, default=128, help="tokens per training/eval sequence")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr = lr * this (cosine floor)")
    t.add_argument("--warmup-steps", type=int, default=100)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--eval-max-tokens", type=int, default=0,
                   help="cap tokens per eval file (0 = the whole file)")
    return p.parse_args(argv)


# --------------------------------------------------------------------- tokenizer
def train_tokenizer(train_file: Path, vocab_size: int) -> tuple[Tokenizer, Qwen2Tokenizer]:
    """Byte-level BPE trained on ``train_file`` only, with Qwen2's exact text pipeline.

    ``AutoTokenizer`` loads a ``model_type: qwen2`` folder as ``Qwen2Tokenizer``,
    which always rebuilds Qwen2's normalizer (NFC) and pre-tokenizer (its split
    regex, then byte-level mapping) around the saved vocab/merges.  Training with
    that same pipeline guarantees the tokenizer used here and the one loaded
    from the saved folder produce identical ids (checked in ``main``).

    Returns the raw trained ``tokenizers.Tokenizer`` (used to encode the
    corpus) and the ``Qwen2Tokenizer`` built from its vocab and merges.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    tok.train([str(train_file)], trainer)
    bpe = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    return tok, Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=merges,
        unk_token=None,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def encode_file(raw_tok: Tokenizer, path: Path) -> torch.Tensor:
    """Token ids of a whole file, no special tokens."""
    ids = raw_tok.encode(path.read_text(encoding="utf-8"), add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.long)


# ------------------------------------------------------------------------- model
def build_config(a: argparse.Namespace, tok: Qwen2Tokenizer) -> Qwen2Config:
    eot = tok.convert_tokens_to_ids(EOT)
    return Qwen2Config(
        vocab_size=len(tok),
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_layers,
        num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_kv_heads,
        head_dim=a.head_dim,
        hidden_act="silu",
        max_position_embeddings=a.max_position_embeddings,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
        use_sliding_window=False,
        attention_dropout=0.0,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        dtype="float32",
    )


@torch.no_grad()
def perplexity(model: Qwen2ForCausalLM, ids: torch.Tensor, seq_len: int, batch_size: int = 32) -> float:
    """Token-level perplexity over non-overlapping ``seq_len``-token windows.

    The file is cut into consecutive windows of ``seq_len + 1`` tokens that share
    one token at the boundary, so every token after the first is predicted
    exactly once, with at most ``seq_len - 1`` tokens of left context.
    """
    model.eval()
    n_windows = (len(ids) - 1) // seq_len
    starts = torch.arange(n_windows) * seq_len
    total_nll, total_tok = 0.0, 0
    for i in range(0, n_windows, batch_size):
        s = starts[i:i + batch_size]
        batch = torch.stack([ids[j:j + seq_len + 1] for j in s.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tok += batch[:, 1:].numel()
    model.train()
    return math.exp(total_nll / total_tok)


def evaluate(model, eval_sets: dict[str, torch.Tensor], seq_len: int) -> dict[str, float]:
    return {name: perplexity(model, ids, seq_len) for name, ids in eval_sets.items()}


def lr_at(step: int, a: argparse.Namespace) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio``."""
    if step < a.warmup_steps:
        return a.lr * (step + 1) / a.warmup_steps
    progress = (step - a.warmup_steps) / max(1, a.steps - a.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return a.lr * (a.min_lr_ratio + (1.0 - a.min_lr_ratio) * cosine)


def train(model: Qwen2ForCausalLM, data: torch.Tensor, a: argparse.Namespace) -> list[tuple[int, float]]:
    """AdamW on random windows of ``data``; returns (step, loss) log points."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norms, biases
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(a.seed + 1)  # batch sampling stream
    offsets = torch.arange(a.seq_len + 1)
    model.train()
    log, running, t0 = [], 0.0, time.perf_counter()
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        starts = torch.randint(0, len(data) - a.seq_len - 1, (a.batch_size,), generator=gen)
        batch = data[starts[:, None] + offsets]
        # Next-token loss on all seq_len positions (batch has seq_len + 1 tokens).
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        running += loss.item()
        if (step + 1) % a.log_every == 0 or step + 1 == a.steps:
            k = (step % a.log_every) + 1
            elapsed = time.perf_counter() - t0
            print(f"step {step + 1:5d}/{a.steps}  loss {running / k:.4f}  lr {lr_at(step, a):.2e}  "
                  f"{elapsed:7.1f}s  ({elapsed / (step + 1):.3f}s/step)", flush=True)
            log.append((step + 1, running / k))
            running = 0.0
    model.eval()
    return log


# ------------------------------------------------------------------------ output
def verify_saved(out: Path, model: Qwen2ForCausalLM, raw_tok: Tokenizer, files: dict[str, Path]) -> str:
    """Reload ``out`` the way users will and check it matches what was trained.

    Checks that ``AutoTokenizer`` gives exactly the training ids on every corpus
    file and that the reloaded weights give the same logits; returns a greedy
    20-token continuation of "The" from the reloaded model.
    """
    tok2 = AutoTokenizer.from_pretrained(out)
    for name, f in files.items():
        text = f.read_text(encoding="utf-8")
        if tok2.backend_tokenizer.encode(text, add_special_tokens=False).ids != \
                raw_tok.encode(text, add_special_tokens=False).ids:
            sys.exit(f"saved tokenizer disagrees with the trained one on {f}")
    model2 = Qwen2ForCausalLM.from_pretrained(out).eval()
    probe = torch.tensor([raw_tok.encode("It is a truth universally acknowledged").ids])
    with torch.no_grad():
        if not torch.equal(model(input_ids=probe).logits, model2(input_ids=probe).logits):
            sys.exit("reloaded model gives different logits")
    prompt = tok2("The", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        gen = model2.generate(**prompt, max_new_tokens=20, do_sample=False,
                              pad_token_id=tok2.pad_token_id)
    return tok2.decode(gen[0], skip_special_tokens=False)



def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_report(out: Path, a: argparse.Namespace, info: dict) -> None:
    ppl_r, ppl_t = info["ppl_random"], info["ppl_trained"]
    cfg = info["config"]
    lines = [
        "# qwen2-tiny: how this model was made",
        "",
        "A tiny Qwen2-architecture causal LM trained from scratch by this project on",
        "public-domain English novels (see `ann2snn/data/corpus/SOURCE.md`).",
        "It is a test/demo model for the ANN-to-SNN converter, not a useful language model.",
        "",
        "## Command",
        "",
        "```",
        info["command"],
        "```",
        "",
        f"- seed: {a.seed}",
        f"- optimizer steps: {a.steps} (batch {a.batch_size} x {a.seq_len} tokens = "
        f"{a.batch_size * a.seq_len} tokens/step, {info['tokens_seen']:,} tokens seen, "
        f"{info['tokens_seen'] / info['train_tokens']:.2f} epochs)",
        f"- AdamW (betas 0.9/0.95, weight decay {a.weight_decay}, grad clip {a.grad_clip}), "
        f"peak lr {a.lr}, {a.warmup_steps} warmup steps, cosine decay to {a.lr * a.min_lr_ratio:g}",
        f"- torch threads: {a.threads}",
        f"- training wall time: {info['train_seconds']:.0f} s ({info['train_seconds'] / 60:.1f} min); "
        f"whole script: {info['total_seconds']:.0f} s",
        f"- final training loss (mean of last {a.log_every} steps): {info['final_train_loss']:.4f}",
        f"- machine: {info['machine']}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}",
        "",
        "## Model",
        "",
        f"- `Qwen2ForCausalLM`, {info['n_params']:,} parameters (tied input/output embeddings)",
        f"- vocab {cfg['vocab_size']} (byte-level BPE, special token `{EOT}` = bos/eos/pad, "
        f"id {cfg['eos_token_id']})",
        f"- hidden {cfg['hidden_size']}, layers {cfg['num_hidden_layers']}, attention heads "
        f"{cfg['num_attention_heads']}, kv heads {cfg['num_key_value_heads']} (GQA), head dim "
        f"{cfg['head_dim']}, intermediate {cfg['intermediate_size']} (SwiGLU)",
        f"- RMSNorm eps {cfg['rms_norm_eps']}, RoPE theta {a.rope_theta:g}, "
        f"max positions {cfg['max_position_embeddings']}, weights float32",
        "",
        "## Data",
        "",
        f"- train: `train.txt`, {info['train_tokens']:,} tokens (sha256 {info['sha256']['train.txt'][:16]}...)",
        f"- heldout: `heldout.txt`, {info['eval_tokens']['heldout']:,} tokens, same author/style, never trained on",
        f"- unseen: `unseen.txt`, {info['eval_tokens']['unseen']:,} tokens, a different book and author",
        "",
        "## Perplexity",
        "",
        f"Token-level perplexity over consecutive {a.seq_len}-token windows of each file "
        "(lower is better; a uniform guess over the vocabulary scores the vocab size).",
        "",
        "| text | random init (same seed, before training) | trained |",
        "| --- | ---: | ---: |",
        f"| heldout.txt | {ppl_r['heldout']:.1f} | {ppl_t['heldout']:.2f} |",
        f"| unseen.txt | {ppl_r['unseen']:.1f} | {ppl_t['unseen']:.2f} |",
        "",
        "## Sample (greedy, 20 new tokens)",
        "",
        "```",
        info["sample"],
        "```",
        "",
    ]
    (out / "TRAINING.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    torch.use_deterministic_algorithms(True)

    files = {name: a.corpus_dir / f"{name}.txt" for name in ("train", "heldout", "unseen")}
    for f in files.values():
        if not f.is_file():
            sys.exit(f"missing corpus file: {f}")

    print(f"[1/5] training byte-level BPE tokenizer (vocab {a.vocab_size}) on {files['train']}", flush=True)
    raw_tok, tok = train_tokenizer(files["train"], a.vocab_size)
    data = encode_file(raw_tok, files["train"])
    eval_sets = {k: encode_file(raw_tok, files[k]) for k in ("heldout", "unseen")}
    if a.eval_max_tokens:
        eval_sets = {k: v[:a.eval_max_tokens] for k, v in eval_sets.items()}
    print(f"      vocab {len(tok)}, train tokens {len(data):,}, "
          + ", ".join(f"{k} tokens {len(v):,}" for k, v in eval_sets.items()), flush=True)

    print("[2/5] building Qwen2ForCausalLM", flush=True)
    config = build_config(a, tok)
    torch.manual_seed(a.seed)
    model = Qwen2ForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    print(f"      {n_params:,} parameters", flush=True)

    print("[3/5] perplexity at random init", flush=True)
    ppl_random = evaluate(model, eval_sets, a.seq_len)
    print(f"      {ppl_random}", flush=True)

    print(f"[4/5] training {a.steps} steps", flush=True)
    t0 = time.perf_counter()
    log = train(model, data, a)
    train_seconds = time.perf_counter() - t0

    print("[5/5] perplexity after training", flush=True)
    ppl_trained = evaluate(model, eval_sets, a.seq_len)
    print(f"      {ppl_trained}", flush=True)

    a.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = False
    save_kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    model.save_pretrained(a.out, **save_kwargs)
    tok.save_pretrained(a.out)

    sample = verify_saved(a.out, model, raw_tok, files)
    print(f"      sample: {sample!r}", flush=True)

    try:
        shown_out = a.out.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        shown_out = a.out
    argv_shown = list(sys.argv[1:] if argv is None else argv)
    command = "python scripts/train_embedded_model.py " + " ".join(shlex.quote(x) for x in argv_shown)
    info = {
        "command": command.strip(),
        "seed": a.seed,
        "steps": a.steps,
        "batch_size": a.batch_size,
        "seq_len": a.seq_len,
        "tokens_seen": a.steps * a.batch_size * a.seq_len,
        "train_tokens": len(data),
        "eval_tokens": {k: len(v) for k, v in eval_sets.items()},
        "n_params": n_params,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "final_train_loss": log[-1][1],
        "loss_log": log,
        "ppl_random": ppl_random,
        "ppl_trained": ppl_trained,
        "sample": sample,
        "config": {k: getattr(config, k) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings",
            "rms_norm_eps", "tie_word_embeddings", "eos_token_id")},
        "sha256": {f.name: sha256(f) for f in files.values()},
        "out": str(shown_out),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
    }
    write_report(a.out, a, info)
    (a.out / "training_metrics.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"saved to {a.out} in {info['total_seconds']:.0f}s total", flush=True)


if __name__ == "__main__":
    main()
