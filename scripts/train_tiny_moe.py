"""Train a tiny Mixtral-shaped MoE causal LM on the Python standard library's own sources.

    python scripts/train_tiny_moe.py [--out tests/data/tiny-moe-stdlib] [--steps 150] ...

Why: every drop-accuracy figure before this came from random weights or a synthetic router.
This writes a checkpoint whose router learned from real text, small enough to commit and to
serve with vLLM on a CPU with its real weights (no --load-format dummy).

Text: the `.py` files of the running interpreter's standard library (`sysconfig`'s stdlib
folder; CPython 3.11.7 here), under the PSF License Version 2 (copied next to the checkpoint
as LICENSE-PSF.txt). Tests, site-packages, codec tables and generated files are left out
(`corpus_files`). The split is by file: a file is held out when the SHA-256 of its relative
path is 0 mod 20, so no held-out file's text is ever trained on, and the split does not
depend on which other files exist.

Model: MixtralForCausalLM (transformers), 4 layers, hidden 256, 32 experts of intermediate
64, top-4, softmax router with the Switch load-balancing loss (coefficient 0.01), a
byte-level BPE tokenizer (4096 entries) trained on the training files with `tokenizers`.
Trained in float32, written in bfloat16 with Mixtral's original checkpoint names
(`block_sparse_moe.experts.N.w1/w2/w3`), which both vLLM lines and transformers read.

Deterministic: one seed drives the initial weights and the batches,
torch.use_deterministic_algorithms(True), a fixed thread count; the same interpreter
version, torch build and thread count give the same bytes (the manifest records them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "data" / "tiny-moe-stdlib"

# Folders of the stdlib that are not library source written by people: tests (much of it
# data-like), third-party packages, codec tables, generated documentation, build files.
EXCLUDED_DIRS = {
    "site-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data",
    "lib-dynload", "__phello__",
}
EXCLUDED_PREFIXES = ("config-", "_sysconfigdata")
HELD_OUT_MODULUS = 20
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
BOS, EOS, PAD = 0, 1, 2

MODEL_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 32,
    "num_experts_per_tok": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "router_aux_loss_coef": 0.01,
    "tie_word_embeddings": False,
}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path) -> list[str]:
    """Relative paths (sorted, '/'-separated) of the stdlib source files used."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS or part.startswith(EXCLUDED_PREFIXES) for part in rel.parts):
            continue
        files.append(rel.as_posix())
    return sorted(files)


def is_held_out(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % HELD_OUT_MODULUS == 0


def read_text(root: Path, rel: str) -> str:
    # A handful of stdlib files are not valid UTF-8 on purpose; replacement keeps it stable.
    return (root / rel).read_text(encoding="utf-8", errors="replace")


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return tokenizer


def write_tokenizer(tokenizer, out: Path, max_len: int) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": max_len,
        # Trained on windows cut anywhere in the text: no BOS is expected in front.
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def model_config_dict(vocab_size: int) -> dict:
    """config.json as written: Mixtral's classic keys, read by transformers 4.x/5.x and vLLM."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab_size,
        **MODEL_SHAPE,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "sliding_window": None,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "use_cache": True,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "torch_dtype": "bfloat16",
    }


def build_model(vocab_size: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        **{k: v for k, v in model_config_dict(vocab_size).items()
           if k not in ("architectures", "model_type", "torch_dtype", "rope_theta")},
        rope_parameters={"rope_type": "default", "rope_theta": MODEL_SHAPE["rope_theta"]},
    )
    config.output_router_logits = True  # for the load-balancing loss while training
    return MixtralForCausalLM(config)


def classic_state_dict(model) -> dict:
    """transformers 5 keeps experts fused ([E, 2I, H] gate|up, [E, H, I] down); vLLM's and the
    original Mixtral checkpoints name each expert's w1 (gate), w3 (up) and w2 (down)."""
    import torch

    out = {}
    inter = MODEL_SHAPE["intermediate_size"]
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to(torch.bfloat16).contiguous()
        if ".mlp.experts.gate_up_proj" in name:
            prefix = name.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.w1.weight"] = tensor[e, :inter].clone()
                out[f"{prefix}.{e}.w3.weight"] = tensor[e, inter:].clone()
        elif ".mlp.experts.down_proj" in name:
            prefix = name.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts")
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.w2.weight"] = tensor[e].clone()
        elif ".mlp.gate.weight" in name:
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = tensor
        else:
            out[name] = tensor
    return out


def unigram_perplexity(train_ids, held_ids, vocab_size: int) -> float:
    """Perplexity on held_ids of the training stream's token frequencies (add-one
    smoothed): what a model that learned nothing about context scores."""
    import torch

    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return float((-logp[held_ids].mean()).exp())


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate(model, windows) -> dict:
    """Mean next-token loss over fixed held-out windows, and the routers' load statistics."""
    import torch

    model.eval()
    losses, per_layer = [], None
    with torch.no_grad():
        for chunk in windows.split(8):
            out = model(input_ids=chunk, labels=chunk, output_router_logits=True)
            losses.append(out.loss.item() - model.config.router_aux_loss_coef * out.aux_loss.item())
            logits = out.router_logits
            if per_layer is None:
                per_layer = [[] for _ in logits]
            for i, layer_logits in enumerate(logits):
                per_layer[i].append(layer_logits.float())
    model.train()
    k = MODEL_SHAPE["num_experts_per_tok"]
    experts = MODEL_SHAPE["num_local_experts"]
    layers = []
    for layer_logits in per_layer:
        probs = torch.cat(layer_logits).softmax(dim=-1)
        top, ids = probs.topk(k, dim=-1)
        weights = top / top.sum(dim=-1, keepdim=True)
        load = torch.bincount(ids.reshape(-1), minlength=experts).double()
        rank_load = load.view(4, -1).sum(dim=1)  # EP4, vLLM's linear placement
        layers.append({
            "expert_max_over_mean": round(float(load.max() / load.mean()), 3),
            "ep4_rank_max_over_mean": round(float(rank_load.max() / rank_load.mean()), 3),
            "mean_sorted_topk_weights": [round(float(v), 4) for v in weights.mean(dim=0)],
        })
    loss = sum(losses) / len(losses)
    return {"loss": round(loss, 4), "perplexity": round(math.exp(loss), 2), "routers": layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=150)  # the committed checkpoint's
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--heldout-chars", type=int, default=48_000,
                        help="characters of held-out text written to heldout.txt")
    args = parser.parse_args()

    # Before torch is imported: the tokenizer trainer's thread pool and torch's must not
    # change the result with the machine.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import torch
    from safetensors.torch import save_file

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    root = stdlib_root()
    files = corpus_files(root)
    train_files = [f for f in files if not is_held_out(f)]
    held_files = [f for f in files if is_held_out(f)]
    train_texts = [read_text(root, f) for f in train_files]
    held_texts = [read_text(root, f) for f in held_files]
    print(f"stdlib {root}: {len(train_files)} training files "
          f"({sum(map(len, train_texts)) / 1e6:.1f} M chars), {len(held_files)} held out "
          f"({sum(map(len, held_texts)) / 1e6:.2f} M chars)", flush=True)

    tokenizer = train_tokenizer(train_texts, args.vocab)
    vocab_size = tokenizer.get_vocab_size()

    def stream(texts: list[str]) -> torch.Tensor:
        ids = []
        for enc in tokenizer.encode_batch(texts):
            ids.extend(enc.ids)
            ids.append(EOS)  # file boundary
        return torch.tensor(ids, dtype=torch.long)

    train_ids, held_ids = stream(train_texts), stream(held_texts)
    tokenized = time.perf_counter()
    print(f"tokenizer: {vocab_size} entries; {train_ids.numel()} training tokens, "
          f"{held_ids.numel()} held-out tokens ({tokenized - started:.0f} s)", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.seq_len)
    # Fixed held-out windows, evenly spaced over the held-out stream.
    starts = torch.linspace(0, held_ids.numel() - args.seq_len - 1, 32).long()
    eval_windows = held_ids[starts.unsqueeze(1) + offsets]

    model = build_model(vocab_size)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    history = [{"step": 0, **evaluate(model, eval_windows)}]
    print(f"step 0: held-out loss {history[0]['loss']}", flush=True)
    log = []
    train_started, train_cpu = time.perf_counter(), time.process_time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        batch_starts = torch.randint(0, train_ids.numel() - args.seq_len, (args.batch,),
                                     generator=gen)
        batch = train_ids[batch_starts.unsqueeze(1) + offsets]
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        aux = out.aux_loss.item()
        lm = out.loss.item() - model.config.router_aux_loss_coef * aux
        log.append({"step": step + 1, "lm_loss": round(lm, 4), "aux_loss": round(aux, 4),
                    "elapsed_s": round(time.perf_counter() - train_started, 1),
                    "cpu_s": round(time.process_time() - train_cpu, 1)})
        if (step + 1) % 10 == 0:
            print(f"step {step + 1}: loss {lm:.3f} aux {aux:.3f} "
                  f"({time.perf_counter() - train_started:.0f} s)", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            history.append({"step": step + 1, **evaluate(model, eval_windows)})
            print(f"step {step + 1}: held-out loss {history[-1]['loss']}", flush=True)
    train_s = time.perf_counter() - train_started
    train_cpu_s = time.process_time() - train_cpu

    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = classic_state_dict(model)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(model_config_dict(vocab_size), indent=2) + "\n")
    write_tokenizer(tokenizer, out_dir, MODEL_SHAPE["max_position_embeddings"])
    shutil.copyfile(root / "LICENSE.txt", out_dir / "LICENSE-PSF.txt")
    heldout = write_heldout(out_dir / "heldout.txt", held_files, held_texts, args.heldout_chars)

    # The checkpoint as written (bf16, classic names) must be the model that was trained.
    check = check_round_trip(model, out_dir, eval_windows[:2])
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: (_shown(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "tokenizers": __import__("tokenizers").__version__,
        "stdlib_root": str(root),
        "licence": "PSF License Version 2 (LICENSE-PSF.txt), the CPython standard library's",
        "files_train": len(train_files),
        "files_held_out": held_files,
        "tokens_train_stream": int(train_ids.numel()),
        "tokens_held_out_stream": int(held_ids.numel()),
        "tokens_seen": args.steps * args.batch * args.seq_len,
        # On the positions `eval` scores (every window token after the first).
        "unigram_perplexity_eval": round(unigram_perplexity(
            train_ids, eval_windows[:, 1:].reshape(-1), vocab_size), 2),
        "params": int(sum(t.numel() for t in tensors.values())),
        # Wall time depends on what else runs; the CPU time (all threads) on much less.
        "train_s": round(train_s, 1),
        "train_cpu_s": round(train_cpu_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "total_cpu_s": round(time.process_time(), 1),
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "heldout_txt": heldout,
        "round_trip": check,
        "sha256": {name: sha256_file(out_dir / name)
                   for name in ("model.safetensors", "tokenizer.json", "heldout.txt")},
        "eval": history,
        "train_log": log,
    }
    (out_dir / "train_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({k: meta[k] for k in ("params", "train_s", "train_cpu_s", "total_s",
                                           "total_cpu_s", "load_average_end",
                                           "round_trip", "sha256")}, indent=1))
    print(f"final held-out: loss {history[-1]['loss']}, perplexity {history[-1]['perplexity']}")


def write_heldout(path: Path, files: list[str], texts: list[str], chars: int) -> dict:
    """The first `chars` characters of the held-out files, whole files first (sorted), each
    after a '# ---- <path>' line: a small, fixed text for tests and the drop study."""
    parts, used, total = [], [], 0
    for rel, text in zip(files, texts):
        if total >= chars:
            break
        piece = f"# ---- {rel}\n" + text[: chars - total]
        parts.append(piece)
        used.append(rel)
        total += len(piece)
    path.write_text("".join(parts))
    return {"files": used, "chars": total}


def check_round_trip(model, out_dir: Path, windows) -> dict:
    """Reload the written checkpoint with transformers and compare logits with the trained
    model rounded to bfloat16 the same way (both computed in float32)."""
    import copy

    import torch
    from transformers import MixtralForCausalLM

    # Only the parameters are rounded: the rotary frequencies are a float32 buffer in both.
    reference = copy.deepcopy(model).eval()
    for param in reference.parameters():
        param.data = param.data.to(torch.bfloat16).float()
    loaded = MixtralForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        a = reference(input_ids=windows).logits
        b = loaded(input_ids=windows).logits
    return {"max_abs_logit_diff": float((a - b).abs().max()), "logit_scale": float(a.abs().max())}


def _shown(path: Path) -> str:
    """A path as recorded in the metadata: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    main()
