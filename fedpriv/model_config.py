"""What the model keys must hold (checked before any work): names, sizes, the language model's options."""

from __future__ import annotations

from fedpriv.config_schema import RunConfig
from fedpriv.errors import ConfigError
from fedpriv.models import MODEL_NAMES


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    _require(value in allowed, key, f"got {value!r}; allowed: {', '.join(allowed)}")


def _set_by(key: str, explicit: set[str] | None) -> bool:
    return explicit is None or any(key == e or key.startswith(e + ".") for e in explicit)


def check_model(rc: RunConfig, explicit: set[str] | None = None) -> None:
    """Refuse model keys out of range, or that the chosen model would not read (``explicit``: the keys
    the user set; None: all)."""
    _one_of(rc.model.name, MODEL_NAMES, "model.name")
    m = rc.model
    _one_of(m.finetune, ("lora", "full"), "model.finetune")
    for key, value in (("model.layers", m.layers), ("model.dim", m.dim), ("model.heads", m.heads),
                       ("model.lora_rank", m.lora_rank)):
        _require(value >= 1, key, f"must be >= 1, got {value}")
    _require(m.dim % m.heads == 0, "model.dim", f"must be a multiple of model.heads ({m.heads}), got {m.dim}")
    _require(m.lora_alpha > 0, "model.lora_alpha", f"must be > 0, got {m.lora_alpha}")
    _require(len(m.lora_targets) > 0, "model.lora_targets", "must name at least one module (e.g. [q_proj,v_proj])")
    _one_of(m.dtype, ("float32", "bfloat16"), "model.dtype")
    _one_of(m.loss_positions, ("all", "last"), "model.loss_positions")
    _require(m.dtype != "bfloat16" or rc.privacy.local.grad_sample_mode != "ghost", "privacy.local.grad_sample_mode",
             "ghost computes per-example norms inside a bfloat16 backward pass, where rounding could let a "
             "gradient past the clip; use hooks (or auto) with model.dtype=bfloat16")
    _require(m.pretrained is None or m.name == "transformer" or rc.dataset.name == "sent140", "model.pretrained",
             f"a checkpoint is a transformer: use model=transformer (got model={m.name})")
    if m.pretrained not in (None, "public") and explicit is not None:  # public: these size the public checkpoint
        for key in ("model.layers", "model.dim", "model.heads"):
            _require(not _set_by(key, explicit), key, "not read with model.pretrained (the checkpoint's own "
                     "config sets the sizes); drop it or drop model.pretrained")
