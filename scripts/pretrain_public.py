#!/usr/bin/env python3
"""Pretrain the small transformer on public text and save it, for private fine-tuning from it.

  python scripts/pretrain_public.py --dataset sent140 --out checkpoints/sent140-public
  python scripts/simulate.py experiment=sent140_lora model.pretrained=checkpoints/sent140-public

``model.pretrained=public`` does the same without a folder (built once, cached). What counts as
public text for each data set, and why no privacy is spent here: fedpriv/pretraining.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpriv.errors import UserError  # noqa: E402
from fedpriv.pretraining import DATASETS, write_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="sent140", choices=DATASETS)
    ap.add_argument("--objective", default=None, choices=["lm", "classify"],
                    help="lm: next token on the public text; classify: its public labels (sent140's default)")
    ap.add_argument("--out", type=Path, required=True, help="folder to write (save_pretrained)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=20, help="at most; stops when the held-out loss rises")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="AdamW's; default 1e-3 (classify), 3e-3 (lm)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        if a.out.exists() and any(a.out.iterdir()):
            raise UserError(f"--out {a.out} exists and is not empty; give a new folder")
        report = write_checkpoint(a.out, a.dataset, objective=a.objective, root=a.data_root, layers=a.layers,
                                  dim=a.dim, heads=a.heads, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                                  seed=a.seed)
    except UserError as exc:
        print(f"fedpriv: error: {exc}", file=sys.stderr)
        return 2
    first = report["loss_per_epoch"][0]["held_out"]
    print(f"pretrained ({report['objective']}) on {report['sequences']:,} public sequences in {report['seconds']:.0f} s: "
          f"held-out loss {first:.3f} -> {report['held_out_loss']:.3f} (epoch {report['epoch_kept']} of "
          f"{report['epochs_run']} kept); wrote {a.out} (model.pretrained={a.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
