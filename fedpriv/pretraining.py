"""Public pretraining: the checkpoint that private fine-tuning starts from (``model.pretrained=public``).

The DP literature's recipe: pretrain without privacy on public data, fine-tune with DP on private
data. No pretrained weights can be fetched here, so this trains one on text that no client holds:

* ``sent140``: the public pool's tweets (10% of users, by a hash of the name: never clients nor test
  users, :mod:`fedpriv.data.sent140`), with their labels (``classify``, the default) or without (``lm``);
* ``shakespeare_lm``: the four romances, whose roles that data set never makes clients (``lm``).

:func:`public_checkpoint` builds it once per machine, under ``$FEDPRIV_CACHE/pretrained/`` (a file
lock and an atomic rename, as the data cache does), from a fixed seed: a public artifact that every
seed of a study shares. ``scripts/pretrain_public.py`` writes one to a folder of the user's choosing.

Privacy: none is spent here, and none needs to be, as long as the text is public as stated; the
private fine-tuning's epsilon covers everything the clients hold. A checkpoint trained on private
data would leak outside any ledger.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fedpriv.data import load_dataset, sent140
from fedpriv.data import shakespeare as shk
from fedpriv.data.cache import cache_dir, file_lock, source_key
from fedpriv.data.text import PAD_ID, TOKENIZER_FILE, encode_padded, tokenizer_digest, vocabulary_size
from fedpriv.errors import ConfigError, UserError
from fedpriv.language_model import LanguageModelSpec, build_config_model

PUBLIC = "public"  # the model.pretrained value that asks for this module's checkpoint
FORMAT_VERSION = 1
DATASETS = ("sent140", "shakespeare_lm")
REPORT = "public_pretraining.json"


def default_objective(dataset: str) -> str:
    return "classify" if dataset == "sent140" else "lm"


def public_ids(dataset: str, root: str | None, tokenizer: str, seq_len: int,
               objective: str) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """The public text as ``int64 (N, L)`` token ids (0 = padding), its labels for ``classify`` (else
    ``None``), and a sentence saying where it comes from."""
    if dataset == "sent140":
        texts, labels = sent140.public_pool(root)
        source = ("Sentiment140's public pool: the tweets of the 10% of users set apart by a hash of the user "
                  "name (fedpriv/data/sent140.py), who are neither clients nor test users; "
                  + ("their sentiment labels are public too" if objective == "classify" else "labels unused"))
        ids = torch.from_numpy(encode_padded(tokenizer, texts, seq_len))
        return ids, torch.tensor(labels) if objective == "classify" else None, source
    if dataset == "shakespeare_lm":
        if objective != "lm":
            raise UserError("--objective classify needs labelled public text: shakespeare_lm has none (use lm)")
        ids = shk.encode(shk.public_text(shk.plays_dir()))
        span = seq_len  # non-overlapping spans of the positions the model takes: each character a target once
        source = (f"the {shk.PUBLIC_GENRE} plays (fedpriv/data/shakespeare.py: shakespeare_lm has no role of theirs "
                  f"as a client), {len(ids):,} characters")
        return torch.from_numpy(ids[: len(ids) // span * span].reshape(-1, span).copy()), None, source
    raise UserError(f"--dataset {dataset}: public pretraining is written for sent140 and shakespeare_lm")


def pretrain(ids: torch.Tensor, labels: torch.Tensor | None, tokenizer: str, seq_len: int, *, layers: int, dim: int,
             heads: int, epochs: int, batch_size: int, lr: float, seed: int) -> tuple[torch.nn.Module, list[tuple[float, float]]]:
    """With ``labels``: a sequence classifier; without: a causal LM (next token at every position). AdamW,
    stopped when the loss on a held-out tenth rises (the best epoch's weights are kept); returns the model and
    (train, held-out) loss per epoch."""
    vocab = vocabulary_size(tokenizer)
    classify = labels is not None
    spec = LanguageModelSpec(task="text_classification" if classify else "next_char", vocab_size=vocab,
                             seq_len=seq_len, num_classes=int(labels.max()) + 1 if classify else vocab,
                             pretrained=None, layers=layers, dim=dim, heads=heads, finetune="full", lora_rank=1,
                             lora_alpha=1.0, lora_targets=("q_proj",), seed=seed)
    torch.manual_seed(seed)
    model = build_config_model(spec)
    targets = labels if classify else ids

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        x = ids[idx]
        if classify:
            logits = model(input_ids=x, attention_mask=(x != PAD_ID).long()).logits
            return torch.nn.functional.cross_entropy(logits, targets[idx])
        return model(input_ids=x, attention_mask=(x != PAD_ID).long(), labels=x.masked_fill(x == PAD_ID, -100)).loss

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ids), generator=g)
    held, train = order[: len(ids) // 10], order[len(ids) // 10:]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    history: list[tuple[float, float]] = []
    best = (float("inf"), None)
    for _ in range(epochs):
        model.train()
        total = 0.0
        for idx in train[torch.randperm(len(train), generator=g)].split(batch_size):
            loss = loss_of(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            held_loss = sum(loss_of(b).item() * len(b) for b in held.split(256)) / len(held)
        history.append((total / len(train), held_loss))
        if held_loss < best[0]:
            best = (held_loss, {k: v.clone() for k, v in model.state_dict().items()})
        elif held_loss > best[0] * 1.02:
            break  # over-fitting the small public pool: keep the best epoch
    model.load_state_dict(best[1])
    return model, history


def write_checkpoint(out: Path, dataset: str, *, objective: str | None = None, root: str | None = None,
                     layers: int = 2, dim: int = 64, heads: int = 4, epochs: int = 20, batch_size: int = 32,
                     lr: float | None = None, seed: int = 0) -> dict:
    """Pretrain on ``dataset``'s public text and write ``out`` (save_pretrained, tokenizer.json, a report)."""
    import time

    objective = objective or default_objective(dataset)
    lr = lr if lr is not None else (1e-3 if objective == "classify" else 3e-3)
    ds = load_dataset(dataset, root)
    ids, labels, source = public_ids(dataset, root, ds.tokenizer, int(ds.input_shape[0]), objective)
    start = time.perf_counter()
    model, history = pretrain(ids, labels, ds.tokenizer, int(ds.input_shape[0]), layers=layers, dim=dim, heads=heads,
                              epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one small shard: a progress bar is only noise in a run's log
    model.save_pretrained(out)
    (out / TOKENIZER_FILE).write_text(ds.tokenizer, encoding="utf-8")
    kept = min(range(len(history)), key=lambda i: history[i][1])
    report = {"dataset": dataset, "objective": objective, "public_text": source, "sequences": len(ids),
              "epochs_run": len(history), "epoch_kept": kept + 1, "held_out_loss": round(history[kept][1], 4),
              "loss_per_epoch": [{"train": round(t, 4), "held_out": round(h, 4)} for t, h in history],
              "parameters": sum(p.numel() for p in model.parameters()), "lr": lr, "seed": seed,
              "seconds": round(time.perf_counter() - start, 1),
              "privacy": "none: public data only; the private fine-tuning's epsilon covers everything clients hold"}
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def public_checkpoint(dataset: str, root: str | None = None, *, layers: int = 2, dim: int = 64,
                      heads: int = 4) -> Path:
    """The cached public checkpoint of ``dataset`` for these sizes, pretrained on first use."""
    if dataset not in DATASETS:
        raise ConfigError(f"config key 'model.pretrained': public pretraining exists for {', '.join(DATASETS)}, "
                        f"not {dataset}; give a checkpoint folder or null")
    ds = load_dataset(dataset, root)
    key = source_key(f"pretrained/{FORMAT_VERSION}", dataset, default_objective(dataset), layers, dim, heads,
                     tokenizer_digest(ds.tokenizer))
    folder = cache_dir() / "pretrained"
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / f"{dataset}-{key}"
    if (entry / REPORT).is_file():
        return entry
    with file_lock(folder / f"{dataset}-{key}.lock"):
        if (entry / REPORT).is_file():
            return entry
        tmp = Path(tempfile.mkdtemp(prefix=f".{dataset}-{key}-", dir=folder))
        try:
            write_checkpoint(tmp, dataset, root=root, layers=layers, dim=dim, heads=heads)
            os.chmod(tmp, 0o755)
            shutil.rmtree(entry, ignore_errors=True)  # a torn entry without its report
            os.rename(tmp, entry)
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(tmp)
    return entry
