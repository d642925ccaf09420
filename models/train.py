"""Train a tiny Qwen3.5 on tiny-gsm8k with transformers' own Qwen3.5 modules.

    python -m models.train --preset trained-dense-bf16 --out OUT --steps 3000      # repo root
    python -m vllm_rocm_fused.tiny_models.train --preset trained-moe-bf16 --out OUT  # installed

What it does, top to bottom:

1. the model: the preset's ``config.json`` (``recipe.py``) built as transformers'
   ``Qwen3_5ForCausalLM`` / ``Qwen3_5MoeForCausalLM`` (Gated DeltaNet on transformers'
   PyTorch path where no fused kernels are installed), plus, when the config asks for
   ``mtp_num_hidden_layers``, the releases' multi-token-prediction block as vLLM's
   ``Qwen3_5MTP`` runs it (:class:`MTPBlock`);
2. the tokenizer: the committed ``trained/tokenizer.json`` (the builder writes the
   same file next to every trained model, so serving tokenizes as training did);
3. the data: a pool of tiny-gsm8k problems (``tiny_gsm8k.problems``, the test split's
   questions excluded) packed into fixed-length rows, most of them in lm-eval's
   few-shot GSM8K format (``Question: q\\nAnswer: a`` joined by blank lines), the rest
   as ChatML chats; the loss counts the answers and the ``Question:`` that follows each
   one (so a server stops where lm-eval's stop sequence expects), not the questions;
4. AdamW with warm-up and cosine decay, bf16 autocast where there is a GPU; the MTP
   block learns from the main model's detached outputs (token t + 2 from the hidden
   state at t and the embedding of token t + 1), so it never changes the main model;
5. a check on fresh test problems: the share of 5-shot prompts whose whole reference
   answer is the argmax at every position under teacher forcing, which is exactly
   "greedy decoding writes the reference answer"; for MTP the share of answer tokens
   its argmax drafts right;
6. ``model.safetensors`` in the releases' names and dtypes (the builder's tensor list
   for the preset, checked name by name and shape by shape) and ``manifest.json``
   (command, seeds, steps, losses, the check's numbers, sha256 of the files).

``--steps auto:S`` measures the step rate after warm-up and sets the step count so
training takes about S seconds; the manifest records the count, and ``--steps N``
with it repeats the run. torch + transformers + tokenizers + safetensors; no vLLM.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import tiny_gsm8k
from .recipe import resolve
from .weights import all_specs

TOKENIZER_FILE = "tokenizer.json"
CHAT_SHARE = 0.15  # rows that are ChatML chats instead of few-shot text


# --- tokenizer --------------------------------------------------------------------------


def committed_tokenizer_path() -> Path:
    return Path(str(resources.files(__package__).joinpath("trained").joinpath(TOKENIZER_FILE)))


def make_task_tokenizer(vocab_size: int):
    """The trained models' tokenizer: the builder's byte-level BPE, its merges learned
    from tiny-gsm8k's own text (deterministic)."""
    from .tokenizer import train_tokenizer

    return train_tokenizer(vocab_size, lines=tiny_gsm8k.corpus_lines())


def load_tokenizer(path: Path | None, vocab_size: int):
    from tokenizers import Tokenizer

    path = path or committed_tokenizer_path()
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
        if tok.get_vocab_size() != vocab_size:
            raise SystemExit(f"{path} has {tok.get_vocab_size()} entries; the preset's vocab_size is {vocab_size}")
        return tok
    print(f"train: {path} not found; training the task tokenizer", flush=True)
    return make_task_tokenizer(vocab_size)


# --- data -----------------------------------------------------------------------------


@dataclass
class Pieces:
    """Token ids of each problem's parts, tokenized once."""

    fewshot_q: list[list[int]]  # "Question: q\nAnswer:"
    fewshot_a: list[list[int]]  # " a\n\n"
    chat_q: list[list[int]]  # "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    chat_a: list[list[int]]  # "a<|im_end|>"
    newline: list[int]  # "\n" after a chat turn
    question_prefix: int  # tokens of "Question:" (learned at the start of each later shot)


def _ids(tok, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def tokenize_pool(tok, pool: list[dict[str, str]]) -> Pieces:
    pieces = Pieces(
        fewshot_q=_ids(tok, [f"Question: {p['question']}\nAnswer:" for p in pool]),
        fewshot_a=_ids(tok, [f" {p['answer']}\n\n" for p in pool]),
        chat_q=_ids(tok, [f"<|im_start|>user\n{p['question']}<|im_end|>\n<|im_start|>assistant\n" for p in pool]),
        chat_a=_ids(tok, [f"{p['answer']}<|im_end|>" for p in pool]),
        newline=_ids(tok, ["\n"])[0],
        question_prefix=len(_ids(tok, ["Question:"])[0]),
    )
    # Pieces are concatenated as ids: that must equal tokenizing the joined text.
    for i in range(min(50, len(pool))):
        j = (i + 1) % len(pool)
        joined = (
            f"Question: {pool[i]['question']}\nAnswer: {pool[i]['answer']}\n\nQuestion: {pool[j]['question']}\nAnswer:"
        )
        assert _ids(tok, [joined])[0] == pieces.fewshot_q[i] + pieces.fewshot_a[i] + pieces.fewshot_q[j], i
        chat = (
            f"<|im_start|>user\n{pool[i]['question']}<|im_end|>\n<|im_start|>assistant\n{pool[i]['answer']}<|im_end|>\n"
        )
        assert _ids(tok, [chat])[0] == pieces.chat_q[i] + pieces.chat_a[i] + pieces.newline, i
    return pieces


def make_row(p: Pieces, rng: random.Random, length: int, pad_id: int) -> tuple[list[int], list[int]]:
    """One training row of ``length`` ids and its loss mask (1 = learn this token)."""
    n = len(p.fewshot_q)
    ids: list[int] = []
    mask: list[int] = []
    if rng.random() < CHAT_SHARE:
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(n)
            q, a = p.chat_q[i], p.chat_a[i]
            if len(ids) + len(q) + len(a) + len(p.newline) > length:
                break
            ids += q + a + p.newline
            mask += [0] * len(q) + [1] * len(a) + [0] * len(p.newline)
    else:
        while True:
            i = rng.randrange(n)
            q, a = p.fewshot_q[i], p.fewshot_a[i]
            if len(ids) + len(q) + len(a) > length:
                break
            q_mask = [0] * len(q)
            if ids:  # after an answer, "Question:" is what the model must write next
                q_mask[: p.question_prefix] = [1] * p.question_prefix
            ids += q + a
            mask += q_mask + [1] * len(a)
    ids += [pad_id] * (length - len(ids))
    mask += [0] * (length - len(mask))
    return ids, mask


def make_batch(p: Pieces, rng: random.Random, batch: int, length: int, pad_id: int, device):
    rows = [make_row(p, rng, length, pad_id) for _ in range(batch)]
    ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
    mask = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


# --- the MTP block --------------------------------------------------------------------


class MTPBlock(nn.Module):
    """The releases' multi-token-prediction block, computed as vLLM's Qwen3_5MTP does:
    h' = fc([norm_e(embed(token t+1)) | norm_h(hidden t)]), one full-attention decoder
    layer, a final norm; the model's lm_head gives the logits of token t + 2."""

    def __init__(self, config, layer_cls, norm_cls, layers: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        layer_config = copy.deepcopy(config)
        layer_config.layer_types = ["full_attention"] * layers
        layer_config.num_hidden_layers = layers
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.pre_fc_norm_embedding = norm_cls(h, eps=eps)
        self.pre_fc_norm_hidden = norm_cls(h, eps=eps)
        self.layers = nn.ModuleList(layer_cls(layer_config, i) for i in range(layers))
        self.norm = norm_cls(h, eps=eps)

    def forward(self, next_embeds, hidden, position_embeddings):
        x = torch.cat([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1)
        x = self.fc(x)
        for layer in self.layers:
            x = layer(x, position_embeddings=position_embeddings, attention_mask=None)
        return self.norm(x)


class TinyQwen(nn.Module):
    """transformers' causal LM plus the optional MTP block."""

    def __init__(self, recipe):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = copy.deepcopy(recipe.config)
        model_type = cfg.pop("model_type")
        self.config = AutoConfig.for_model(model_type, **cfg)
        self.lm = AutoModelForCausalLM.from_config(self.config, attn_implementation="sdpa")
        self.lm.float()
        layers = int(getattr(self.config, "mtp_num_hidden_layers", 0) or 0)
        self.mtp = None
        self._rope = None
        if layers:
            decoder = self.lm.model.layers
            attn_layer = next(m for m in decoder if hasattr(m, "self_attn"))
            self.mtp = MTPBlock(self.config, type(attn_layer), type(self.lm.model.norm), layers)
            self.mtp.apply(self.lm._init_weights)
            self.mtp.float()
            # The rotary (cos, sin) the main model computed for this batch: the MTP block
            # runs on positions 0..L-2, a prefix of the model's 0..L-1.
            attn_layer.register_forward_pre_hook(self._grab_rope, with_kwargs=True)

    def _grab_rope(self, module, args, kwargs):
        self._rope = kwargs.get("position_embeddings")

    def forward(self, ids):
        out = self.lm.model(input_ids=ids)
        hidden = out.last_hidden_state
        logits = self.lm.lm_head(hidden)
        mtp_logits = None
        if self.mtp is not None:
            if self._rope is not None:
                cos, sin = self._rope
            else:  # a transformers version that passes it positionally: compute it again
                positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
                cos, sin = self.lm.model.rotary_emb(hidden, positions)
            self._rope = None
            emb = F.embedding(ids[:, 1:], self.lm.model.embed_tokens.weight.detach())
            h = self.mtp(emb, hidden[:, :-1].detach(), (cos[..., :-1, :], sin[..., :-1, :]))
            mtp_logits = F.linear(h, self.lm.lm_head.weight.detach())
        return logits, mtp_logits


def masked_ce(logits, targets, mask):
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (loss * mask.reshape(-1)).sum() / mask.sum().clamp(min=1)


def losses(model: TinyQwen, ids, mask):
    logits, mtp_logits = model(ids)
    main = masked_ce(logits[:, :-1], ids[:, 1:], mask[:, 1:])
    mtp = masked_ce(mtp_logits[:, :-1], ids[:, 2:], mask[:, 2:]) if mtp_logits is not None else None
    return main, mtp


# --- checkpoint in the releases' names --------------------------------------------------


def release_state_dict(model: TinyQwen, recipe) -> dict[str, torch.Tensor]:
    """The trained tensors under the checkpoint names and dtypes of ``weights.all_specs``
    (MoE experts split per expert as in the FP8 releases); every name checked."""
    sd = {k: v.detach().float().cpu() for k, v in model.lm.state_dict().items()}
    if model.mtp is not None:
        sd.update({f"mtp.{k}": v.detach().float().cpu() for k, v in model.mtp.state_dict().items()})
    out: dict[str, torch.Tensor] = {}
    for name, value in sd.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            inter = value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = value[e, :inter]
                out[f"{prefix}{e}.up_proj.weight"] = value[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(value.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = value[e]
        else:
            out[name] = value
    specs = {s.name: s for s in all_specs(recipe)}
    missing, extra = sorted(set(specs) - set(out)), sorted(set(out) - set(specs))
    if missing or extra:
        raise RuntimeError(
            f"trained tensors do not match the checkpoint layout: missing {missing[:8]}, unexpected {extra[:8]}"
        )
    for name, spec in specs.items():
        if tuple(out[name].shape) != spec.shape:
            raise RuntimeError(f"{name}: trained shape {tuple(out[name].shape)}, checkpoint shape {spec.shape}")
        out[name] = out[name].to(spec.dtype).contiguous()
    return out


# --- the check --------------------------------------------------------------------------


@torch.no_grad()
def teacher_forced_check(model: TinyQwen, tok, count: int, seed: int, device, shots: int = 5) -> dict:
    """Greedy exact match of the reference answer (through ``#### N``) on ``count``
    test problems, 5-shot prompts as lm-eval's gsm8k task writes them."""
    train, test = tiny_gsm8k.split(seed)
    rng = random.Random(f"train-check/{seed}")
    items = rng.sample(test, min(count, len(test)))
    model.eval()
    right = stops = 0
    mtp_right = mtp_total = 0
    by_template: dict[str, list[int]] = {}
    for start in range(0, len(items), 32):
        chunk = items[start : start + 32]
        seqs, spans = [], []
        for item in chunk:
            prompt = tiny_gsm8k.fewshot_prompt(item["question"], rng.sample(train, shots))
            p_ids = tok.encode(prompt, add_special_tokens=False).ids
            a_ids = tok.encode(f" {item['answer']}", add_special_tokens=False).ids
            s_ids = tok.encode("\n\nQuestion:", add_special_tokens=False).ids
            seqs.append(p_ids + a_ids + s_ids)
            spans.append((len(p_ids), len(p_ids) + len(a_ids), len(p_ids) + len(a_ids) + len(s_ids)))
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        ids = ids.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, mtp_logits = model(ids)
        pred = logits.argmax(-1).cpu()
        mtp_pred = mtp_logits.argmax(-1).cpu() if mtp_logits is not None else None
        for i, (a0, a1, s1) in enumerate(spans):
            ok = bool((pred[i, a0 - 1 : a1 - 1] == ids[i, a0:a1].cpu()).all())
            right += ok
            stops += ok and bool((pred[i, a1 - 1 : s1 - 1] == ids[i, a1:s1].cpu()).all())
            template = _template_of(chunk[i]["question"])
            by_template.setdefault(template, [0, 0])
            by_template[template][0] += ok
            by_template[template][1] += 1
            if mtp_pred is not None:  # drafts of answer tokens a0+1..a1-1 (made at a0-1..a1-3)
                mtp_right += int((mtp_pred[i, a0 - 1 : a1 - 2] == ids[i, a0 + 1 : a1].cpu()).sum())
                mtp_total += a1 - a0 - 1
    model.train()
    out = {
        "problems": len(items),
        "exact_match": right / len(items),
        "exact_match_and_stop": stops / len(items),
        "by_template": {k: round(v[0] / v[1], 4) for k, v in sorted(by_template.items())},
    }
    if mtp_total:
        out["mtp_draft_accuracy"] = mtp_right / mtp_total
    return out


def _template_of(question: str) -> str:
    keys = (
        ("equally among", "share_then_find"),
        ("twice as many", "compare_three"),
        ("change", "change"),
        ("pages", "pages_left"),
        ("rows of", "garden_rows"),
        ("bakes", "half_then_more"),
        ("bricks", "trips"),
        ("every day for", "save_spend"),
        ("boxes with", "boxes_give"),
        ("gives", "give_away"),
    )
    return next((name for key, name in keys if key in question), "buy_more")


# --- main ---------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, help="a trained-* preset (its bf16 variant)")
    p.add_argument("--out", required=True, help="folder for model.safetensors, manifest.json, train_log.jsonl")
    p.add_argument("--steps", default="3000", help="optimizer steps, or auto:SECONDS (default 3000)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=640)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument(
        "--mtp-weight", type=float, default=1.0, help="weight of the MTP loss (its gradients reach only the MTP block)"
    )
    p.add_argument("--seed", type=int, default=0, help="model init and row sampling")
    p.add_argument(
        "--data-seed",
        type=int,
        default=tiny_gsm8k.DEFAULT_SEED,
        help="tiny-gsm8k seed: the test split excluded from training, and the check",
    )
    p.add_argument("--pool", type=int, default=200_000, help="distinct training problems")
    p.add_argument("--check-problems", type=int, default=512)
    p.add_argument(
        "--time-limit", type=float, default=0.0, help="stop (and save) after this many seconds of training (0: none)"
    )
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json (default: the committed one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--log-every", type=int, default=100)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    torch.manual_seed(args.seed)
    recipe = resolve(args.preset)
    text = recipe.text
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tok = load_tokenizer(args.tokenizer, text["vocab_size"])
    pad_id = tok.token_to_id("<|endoftext|>")
    _, test = tiny_gsm8k.split(args.data_seed)
    stream = tiny_gsm8k.problems(args.data_seed + 1, exclude=(t["question"] for t in test))
    pool = [next(stream) for _ in range(args.pool)]
    pieces = tokenize_pool(tok, pool)
    print(
        f"train: {args.preset} on {device}; {len(pool)} problems tokenized in {time.time() - t_start:.1f} s", flush=True
    )

    model = TinyQwen(recipe).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    auto_budget = float(args.steps.split(":", 1)[1]) if args.steps.startswith("auto:") else None
    total = int(args.steps) if auto_budget is None else 10**9
    rng = random.Random(f"train-rows/{args.seed}")
    log = (out / "train_log.jsonl").open("w")
    print(f"train: {n_params / 1e6:.2f} M parameters, batch {args.batch} x {args.seq_len}", flush=True)

    t0 = time.time()
    t_mark = t0  # reset at step 30, where the rate measurement starts
    ema: float | None = None
    ema_mtp: float | None = None
    step = 0
    stopped_early = False
    while step < total:
        ids, mask = make_batch(pieces, rng, args.batch, args.seq_len, pad_id, device)
        lr = lr_at(step, total, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            main_loss, mtp_loss = losses(model, ids, mask)
        loss = main_loss + (args.mtp_weight * mtp_loss if mtp_loss is not None else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0 or step % args.log_every == 0 or step == total:
            value = main_loss.item()
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            if mtp_loss is not None:
                m = mtp_loss.item()
                ema_mtp = m if ema_mtp is None else 0.9 * ema_mtp + 0.1 * m
        if auto_budget is not None and step == 80:
            rate = 50 / (time.time() - t_mark)
            total = max(step + 1, int(80 + rate * (auto_budget - (time.time() - t0))))
            print(f"train: {rate:.2f} steps/s -> {total} steps for {auto_budget:.0f} s", flush=True)
        if step == 30:
            t_mark = time.time()
        if step % args.log_every == 0 or step == total:
            elapsed = time.time() - t0
            row = {"step": step, "loss": None if ema is None else round(ema, 4), "lr": lr, "seconds": round(elapsed, 1)}
            if ema_mtp is not None:
                row["mtp_loss"] = round(ema_mtp, 4)
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(
                f"train: step {step}/{total if total < 10**9 else '?'} loss {ema:.4f}"
                + (f" mtp {ema_mtp:.4f}" if ema_mtp is not None else "")
                + f" lr {lr:.2e} {elapsed:.0f} s",
                flush=True,
            )
        if args.time_limit and time.time() - t0 > args.time_limit:
            print(f"train: time limit reached at step {step}", flush=True)
            stopped_early = True
            break
    train_seconds = time.time() - t0
    log.close()

    check = teacher_forced_check(model, tok, args.check_problems, args.data_seed, device)
    print(f"train: check {json.dumps(check)}", flush=True)

    from safetensors.torch import save_file

    tensors = release_state_dict(model, recipe)
    weights_path = out / "model.safetensors"
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    tok_path = out / TOKENIZER_FILE
    tok.save(str(tok_path))
    import transformers

    manifest = {
        "preset": args.preset,
        "architecture": recipe.config["architectures"][0],
        "command": "python -m vllm_rocm_fused.tiny_models.train "
        + " ".join(
            "OUT" if a == args.out else (str(step) if a.startswith("auto:") else a)
            for a in (argv if argv is not None else sys.argv[1:])
        ),
        "steps": step,
        "steps_requested": args.steps,
        "stopped_early": stopped_early,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "seed": args.seed,
        "data_seed": args.data_seed,
        "pool": args.pool,
        "parameters": n_params,
        "final_loss": None if ema is None else round(ema, 4),
        "final_mtp_loss": round(ema_mtp, 4) if ema_mtp is not None else None,
        "train_seconds": round(train_seconds, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "teacher_forced_check": check,
        "sha256": {"model.safetensors": sha256(weights_path), TOKENIZER_FILE: sha256(tok_path)},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(
        f"train: wrote {weights_path} ({weights_path.stat().st_size / 2**20:.1f} MiB) in {time.time() - t_start:.0f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
