"""Language models for the text tasks: Hugging Face ``transformers`` with LoRA adapters from ``peft``.

``model=transformer`` is either a local checkpoint (``model.pretrained=<folder>``, what
``save_pretrained`` wrote; loaded with ``local_files_only``, nothing is downloaded) or a small
Llama built from ``model.layers/dim/heads``. Sequence classification for ``text_classification``
(Sent140), a causal LM read at the window's last position for ``next_char`` (Shakespeare).

With ``model.finetune=lora`` only the LoRA adapters of ``model.lora_targets`` (and a
classification head, which a new task needs) train. :class:`AdapterModel`'s ``state_dict`` holds
exactly those tensors: they are what a reply carries, what the server clips, noises, aggregates and
checkpoints, and what ``model.pt`` holds. The frozen base is built or loaded once per process
(:func:`frozen_template`) and shared by every model of that process; it never travels. Every
process rebuilds the same base (same folder, or same config and seed), which
:func:`base_fingerprint` lets a test check.

Privacy: DP on the adapters is DP on everything that leaves a client, because the base is a
function of public inputs only (the checkpoint, or the seed). A base pretrained on private data
would not be: ``scripts/pretrain_public.py`` pretrains on a stated public pool.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedpriv.data.text import PAD_ID, TOKENIZER_FILE, tokenizer_digest, vocabulary_size
from fedpriv.errors import ConfigError

ARCHITECTURE = "llama"  # of the built-from-config model: RMSNorm and rotary positions, no BatchNorm
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LanguageModelSpec:
    """What decides a language model; equal specs build equal models in every process."""

    task: str  # text_classification | next_char
    vocab_size: int  # ids the data can hold (the tokenizer's size)
    seq_len: int  # positions one example needs
    num_classes: int
    pretrained: str | None
    layers: int
    dim: int
    heads: int
    finetune: str  # lora | full
    lora_rank: int
    lora_alpha: float
    lora_targets: tuple[str, ...]
    seed: int
    # float32 | bfloat16: the frozen base's weights and the forward pass (autocast); what trains, travels
    # and is noised stays float32. No privacy meaning: clipping reads float32 per-example gradients.
    dtype: str = "float32"
    # next_char: all | last. all: a causal LM's loss at every position of the window (the target of
    # position i is token i+1, the window's label after the last); last: the window's label only.
    # The privacy unit is the window either way (one example, one clipped gradient).
    loss_positions: str = "all"


class AdapterModel(nn.Module):
    """A transformer whose state dict is only what trains: ``model(ids) -> logits``.

    ``forward`` takes ``int64 (N, L)`` token ids, 0 = padding (masked out of attention), and returns
    float32 ``(N, classes)`` logits: the classifier's, or the causal LM's at the last position. A causal
    LM with ``every_position`` returns ``(N, L, vocabulary)`` in training mode, for the loss at every
    position (:func:`batch_loss`); evaluation and the audits always read the last position.
    ``compute_dtype`` bfloat16 runs the forward pass under autocast (the frozen base is stored in it).
    """

    def __init__(self, network: nn.Module, task: str, compute_dtype: torch.dtype = torch.float32,
                 every_position: bool = False):
        super().__init__()
        self.network = network
        self.task = task
        self.compute_dtype = compute_dtype
        self.every_position = every_position and task == "next_char"
        self._travel = [name for name, p in self.named_parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=self.compute_dtype,
                            enabled=self.compute_dtype != torch.float32):
            if self.task == "text_classification":
                return self.network(input_ids=x, attention_mask=(x != PAD_ID).long()).logits.float()
            logits = self.network(input_ids=x).logits
            return (logits if self.training and self.every_position else logits[:, -1, :]).float()

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        full = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        out = OrderedDict() if destination is None else destination
        for name in self._travel:
            out[prefix + name] = full[prefix + name]
        return out

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        if strict and set(state_dict) != set(self._travel):
            missing = sorted(set(self._travel) - set(state_dict))[:3]
            extra = sorted(set(state_dict) - set(self._travel))[:3]
            raise RuntimeError(f"adapter state does not fit this model: missing {missing}, unexpected {extra}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def travelling_parameters(self) -> int:
        """Numbers a reply carries (what trains)."""
        travel = set(self._travel)
        return sum(p.numel() for n, p in self.named_parameters() if n in travel)

    def full_model_parameters(self) -> int:
        """Numbers of the model itself (no adapters, one head): what full fine-tuning would move."""
        return sum(p.numel() for n, p in self.named_parameters() if "lora_" not in n and "modules_to_save" not in n)


# ------------------------------------------------------------------------------ building


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "some weights were newly initialised": expected for a new head
    hf_logging.disable_progress_bar()  # "Loading weights" bars on every worker's stderr
    # transformers 5 warns about a deprecated attribute that peft and deepcopy read
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def check_pretrained_folder(folder: str) -> Path:
    """The checkpoint folder, or one ``ConfigError`` line saying why it cannot be one."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"config key 'model.pretrained': folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise ConfigError(f"config key 'model.pretrained': {path} is not a Hugging Face model folder (no "
                          f"config.json; write one with save_pretrained or scripts/pretrain_public.py)")
    return path


def pretrained_tokenizer(folder: str) -> str | None:
    """The JSON of the checkpoint's own ``tokenizer.json``, or ``None`` when it brings none."""
    path = check_pretrained_folder(folder) / TOKENIZER_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _load_pretrained(spec: LanguageModelSpec) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = check_pretrained_folder(str(spec.pretrained))
    key = "config key 'model.pretrained'"
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{key}: {path}/config.json is not a model config ({str(exc).splitlines()[0][:160]})") from None
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < spec.vocab_size:
        raise ConfigError(f"{key}: {path} embeds {vocab} token ids but the data's tokenizer makes "
                          f"{spec.vocab_size}; use the checkpoint's own tokenizer.json or one that fits")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and int(positions) < spec.seq_len:
        raise ConfigError(f"{key}: {path} takes at most {positions} positions, the data has sequences of "
                          f"{spec.seq_len} tokens")
    try:
        if spec.task == "text_classification":
            config.num_labels = spec.num_classes
            config.pad_token_id = PAD_ID
            return AutoModelForSequenceClassification.from_pretrained(path, config=config, local_files_only=True)
        return AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"{key}: {path} cannot be loaded for {spec.task} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None


def build_config_model(spec: LanguageModelSpec) -> nn.Module:
    """A small Llama sized by the spec, randomly initialised (under the caller's torch seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.dim, intermediate_size=4 * spec.dim,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.heads, max_position_embeddings=max(spec.seq_len, 64),
                         pad_token_id=PAD_ID, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
                         num_labels=spec.num_classes)
    cls = LlamaForSequenceClassification if spec.task == "text_classification" else LlamaForCausalLM
    return cls(config)


def _head_names(network: nn.Module, task: str) -> list[str]:
    """The new task's head (trained and sent with the adapters); a causal LM's head stays frozen."""
    if task != "text_classification":
        return []
    for name in ("score", "classifier"):
        if isinstance(getattr(network, name, None), nn.Module):
            return [name]
    raise ConfigError("config key 'model.pretrained': the sequence classifier has no 'score' or "
                      "'classifier' head that LoRA could train beside the adapters")


def _with_lora(network: nn.Module, spec: LanguageModelSpec) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    linear = sorted({name.rsplit(".", 1)[-1] for name, m in network.named_modules() if isinstance(m, nn.Linear)})
    missing = [t for t in spec.lora_targets if t not in linear]
    if missing:
        raise ConfigError(f"config key 'model.lora_targets': no linear module named {', '.join(missing)} in the "
                          f"model; its linear modules: {', '.join(linear)}")
    config = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                        target_modules=list(spec.lora_targets), modules_to_save=_head_names(network, spec.task) or None)
    return get_peft_model(network, config)


_templates: dict[LanguageModelSpec, AdapterModel] = {}
_templates_lock = threading.Lock()


def frozen_template(spec: LanguageModelSpec) -> AdapterModel:
    """The process's one copy of the model for ``spec`` (built or loaded on first use)."""
    with _templates_lock:
        model = _templates.get(spec)
        if model is None:
            _quiet_transformers()
            state = torch.random.get_rng_state()
            torch.manual_seed(spec.seed)  # the same random base and initial adapters in every process
            try:
                network = _load_pretrained(spec) if spec.pretrained else build_config_model(spec)
                network.config.pad_token_id = PAD_ID
                if spec.finetune == "lora":
                    network = _with_lora(network, spec)
            finally:
                torch.random.set_rng_state(state)
            dtype = DTYPES[spec.dtype]
            for p in network.parameters():
                if not p.requires_grad:  # the frozen base only: what trains keeps float32
                    p.data = p.data.to(dtype)
            model = AdapterModel(network, spec.task, compute_dtype=dtype,
                                 every_position=spec.loss_positions == "all")
            _templates[spec] = model
        return model


def new_language_model(spec: LanguageModelSpec) -> AdapterModel:
    """A fresh model for ``spec``: its own trainable tensors, the frozen base shared with the template."""
    template = frozen_template(spec)
    shared = {id(p): p for p in template.parameters() if not p.requires_grad}
    return copy.deepcopy(template, memo=dict(shared))


def base_fingerprint(model: AdapterModel) -> str:
    """A hash of the frozen weights: equal in every process that built the same spec."""
    h = hashlib.blake2b(digest_size=8)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def batch_loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, criterion: Any = None) -> torch.Tensor:
    """The training loss of a batch: cross-entropy of ``(N, classes)`` logits against ``y``, or for a
    causal LM's ``(N, L, V)`` the mean over every position of the next token (``x`` shifted left, the
    window's label ``y`` after its last position). ``criterion`` defaults to mean cross-entropy; Opacus's
    ghost-clipping loss gets the logits' shape, so that each window (the privacy unit) is one sample."""
    criterion = criterion if criterion is not None else F.cross_entropy
    if logits.dim() != 3:
        return criterion(logits, y)
    targets = torch.cat([x[:, 1:], y[:, None]], dim=1).reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1])
    if type(criterion).__name__ == "DPLossFastGradientClipping":
        return criterion(flat, targets, shape=logits.shape)
    return criterion(flat, targets)


def base_bytes(model: AdapterModel) -> int:
    """Bytes of the frozen base (one copy per worker process)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


def check_tokenizer_fits(spec: LanguageModelSpec, data_tokenizer: str | None, folder_tokenizer: str | None) -> None:
    """Refuse a checkpoint whose tokenizer is not the one that made the data's ids."""
    if folder_tokenizer is None or data_tokenizer is None:
        return
    if tokenizer_digest(folder_tokenizer) != tokenizer_digest(data_tokenizer):
        raise ConfigError(f"config key 'model.pretrained': {spec.pretrained}'s tokenizer.json ("
                          f"{vocabulary_size(folder_tokenizer)} ids) is not the one this data set's ids come from; "
                          f"only sent140 is re-tokenised with a checkpoint's own tokenizer")
