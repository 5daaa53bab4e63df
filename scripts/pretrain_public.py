#!/usr/bin/env python3
"""Pretrain the small transformer on public text, for private fine-tuning from it (model.pretrained=).

The DP literature's recipe: a model pretrained without privacy on public data, then fine-tuned with
DP on private data. No pretrained weights can be fetched here, so this writes one: a causal language
model (next token at every position) trained on text that no client holds, saved with
``save_pretrained`` beside the tokenizer that made the data's ids and a ``public_pretraining.json``
saying what it was trained on.

  python scripts/pretrain_public.py --dataset sent140 --out checkpoints/sent140-public
  python scripts/simulate.py experiment=sent140_lora model.pretrained=checkpoints/sent140-public

Public text: ``sent140``: the users of the public pool (fedpriv/data/sent140.py: 10% of users, chosen
by a hash of the name, never clients nor test users).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fedpriv.data import load_dataset  # noqa: E402
from fedpriv.data.text import PAD_ID, TOKENIZER_FILE, encode_padded, vocabulary_size  # noqa: E402
from fedpriv.errors import UserError  # noqa: E402
from fedpriv.language_model import LanguageModelSpec, build_config_model  # noqa: E402


def public_text(dataset: str, root: str | None) -> tuple[list[str], str]:
    """The public texts and a sentence saying where they come from."""
    if dataset == "sent140":
        from fedpriv.data.sent140 import public_pool

        texts, _ = public_pool(root)
        return texts, ("Sentiment140's public pool: the tweets of the 10% of users set apart by a hash of the user "
                       "name (fedpriv/data/sent140.py), who are neither clients nor test users; labels unused")
    raise UserError(f"--dataset {dataset}: public pretraining is written for sent140 only")


def pretrain(texts: list[str], tokenizer: str, seq_len: int, *, layers: int, dim: int, heads: int, epochs: int,
             batch_size: int, lr: float, seed: int) -> tuple[torch.nn.Module, list[tuple[float, float]]]:
    """A causal LM trained on ``texts`` with AdamW, stopped when the loss on a held-out tenth of the
    public texts rises (the best epoch's weights are kept); returns it and (train, held-out) loss per epoch."""
    ids = torch.from_numpy(encode_padded(tokenizer, texts, seq_len))
    vocab = vocabulary_size(tokenizer)
    spec = LanguageModelSpec(task="next_char", vocab_size=vocab, seq_len=seq_len, num_classes=vocab,
                             pretrained=None, layers=layers, dim=dim, heads=heads, finetune="full", lora_rank=1,
                             lora_alpha=1.0, lora_targets=("q_proj",), seed=seed)
    torch.manual_seed(seed)
    model = build_config_model(spec)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ids), generator=g)
    held, train = ids[order[: len(ids) // 10]], ids[order[len(ids) // 10:]]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    history: list[tuple[float, float]] = []
    best = (float("inf"), None)
    for _ in range(epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(train), generator=g).split(batch_size):
            loss = _lm_loss(model, train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            held_loss = sum(_lm_loss(model, b).item() * len(b) for b in held.split(256)) / len(held)
        history.append((total / len(train), held_loss))
        if held_loss < best[0]:
            best = (held_loss, {k: v.clone() for k, v in model.state_dict().items()})
        elif held_loss > best[0] * 1.02:
            break  # over-fitting the small public pool: keep the best epoch
    model.load_state_dict(best[1])
    return model, history


def _lm_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    labels = x.masked_fill(x == PAD_ID, -100)  # no loss on padding
    return model(input_ids=x, attention_mask=(x != PAD_ID).long(), labels=labels).loss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="sent140")
    ap.add_argument("--out", type=Path, required=True, help="folder to write (save_pretrained)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        ds = load_dataset(a.dataset, a.data_root)
        texts, source = public_text(a.dataset, a.data_root)
        if a.out.exists() and any(a.out.iterdir()):
            raise UserError(f"--out {a.out} exists and is not empty; give a new folder")
    except UserError as exc:
        print(f"fedpriv: error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    model, history = pretrain(texts, ds.tokenizer, int(ds.input_shape[0]), layers=a.layers, dim=a.dim, heads=a.heads,
                             epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    seconds = time.perf_counter() - start
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(a.out)
    (a.out / TOKENIZER_FILE).write_text(ds.tokenizer, encoding="utf-8")
    kept = min(range(len(history)), key=lambda i: history[i][1])
    report = {"dataset": a.dataset, "public_text": source, "texts": len(texts), "epochs_run": len(history),
              "epoch_kept": kept + 1, "held_out_loss": round(history[kept][1], 4),
              "loss_per_epoch": [{"train": round(t, 4), "held_out": round(h, 4)} for t, h in history],
              "parameters": sum(p.numel() for p in model.parameters()), "seconds": round(seconds, 1),
              "privacy": "none: public data only; the private fine-tuning's epsilon covers everything clients hold"}
    (a.out / "public_pretraining.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"pretrained on {len(texts):,} public texts in {seconds:.0f} s: held-out loss {history[0][1]:.3f} -> "
          f"{history[kept][1]:.3f} (epoch {kept + 1} of {len(history)} kept); wrote {a.out} (model.pretrained={a.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
