"""Training a language model: the causal-LM loss at every position, bfloat16 bases, and whether LoRA
workers fit the GPUs they are placed on (no GPU needed: the GPUs are described)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpriv.compose import compose_config
from fedpriv.errors import ConfigError
from fedpriv.gpu_fit import GIB, GpuInfo, check_gpu_fit
from fedpriv.language_model import LanguageModelSpec, base_bytes, batch_loss, new_language_model


def causal_lm(dtype="float32", loss_positions="all", seed=1):
    spec = LanguageModelSpec(task="next_char", vocab_size=30, seq_len=10, num_classes=30, pretrained=None, layers=1,
                             dim=16, heads=2, finetune="lora", lora_rank=2, lora_alpha=4.0,
                             lora_targets=("q_proj", "v_proj"), seed=seed, dtype=dtype, loss_positions=loss_positions)
    model = new_language_model(spec)
    with torch.no_grad():  # LoRA's B starts at zero: move it so that A's gradient is not zero too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    return model


def windows(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 30, size=(n, 10)), rng.integers(1, 30, size=n)


def test_the_loss_at_every_position_is_transformers_own_causal_lm_loss():
    """The window followed by its label is a text of L + 1 tokens: Hugging Face's loss on it (labels
    shifted inside transformers) is the mean next-token loss over the window's L positions."""
    model = causal_lm().train()
    x, y = map(torch.from_numpy, windows())
    ours = batch_loss(model(x), x, y)
    text = torch.cat([x, y[:, None]], dim=1)
    theirs = model.network(input_ids=text, labels=text).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert model.eval()(x).shape == (6, 30)  # evaluation and the audits read the last position only
    last = causal_lm(loss_positions="last").train()
    assert last(x).shape == (6, 30)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_sgd_clips_each_windows_gradient_of_the_loss_at_every_position(mode):
    """The privacy unit is the window: noise 0, q = 1, one Opacus step equals each window's gradient of
    its every-position loss, clipped by hand to 0.3, averaged."""
    from clients.dp_sgd import train_dp_sgd

    x, y = windows()
    reference, model = causal_lm(), causal_lm()
    reference.train()
    trainable = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for _, p in trainable]
    for i in range(len(x)):
        reference.zero_grad()
        xi, yi = torch.from_numpy(x[i:i + 1]), torch.from_numpy(y[i:i + 1])
        batch_loss(reference(xi), xi, yi).backward()
        grads = [p.grad.detach().clone() for _, p in trainable]
        factor = min(1.0, 0.3 / (float(torch.sqrt(sum((g ** 2).sum() for g in grads))) + 1e-6))
        for t, g in zip(total, grads):
            t += factor * g
    result = train_dp_sgd(model, x, y, epochs=1, batch_size=len(x), lr=1.0, noise_multiplier=0.0, max_grad_norm=0.3,
                          grad_sample_mode=mode, max_physical_batch_size=4, sampling_seed=1, noise_seed=1)
    assert result.steps == 1 and result.examples_seen == len(x)
    after = dict(result.model.named_parameters())
    for (name, p0), t in zip(trainable, total):
        torch.testing.assert_close(after[name].detach(), p0.detach() - t / len(x), atol=1e-6, rtol=1e-5)


def test_a_bfloat16_base_trains_and_travels_float32_adapters():
    model = causal_lm(dtype="bfloat16")
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())  # what replies carry
    assert base_bytes(model) * 2 == base_bytes(causal_lm(dtype="float32"))
    x, y = map(torch.from_numpy, windows())
    out = model.eval()(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    model.train()
    batch_loss(model(x), x, y).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_dp_sgd_on_a_bfloat16_base_never_lets_a_gradient_past_the_clip():
    """Per-example gradients of a bfloat16 forward pass come back in bfloat16; their norms must be read
    in float32, or a gradient read 0.4% short would pass the clip a little larger than C. One window,
    q = 1, lr 1, no noise: the step is that window's clipped gradient; its norm is C, never above."""
    from clients.dp_sgd import train_dp_sgd

    clip = 1e-3  # far below every gradient's norm: each one is clipped
    worst = 0.0
    for seed in range(12):
        model = causal_lm(dtype="bfloat16", seed=seed)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        x, y = windows(n=1, seed=seed)
        r = train_dp_sgd(model, x, y, epochs=1, batch_size=1, lr=1.0, noise_multiplier=0.0, max_grad_norm=clip,
                         grad_sample_mode="hooks", sampling_seed=seed, noise_seed=0)
        if r.examples_seen != 1:
            continue
        step = torch.sqrt(sum(((p.detach() - before[n]).double() ** 2).sum()
                              for n, p in r.model.named_parameters() if p.requires_grad))
        worst = max(worst, float(step) / clip)
    assert 0.999 < worst <= 1.0 + 1e-5, worst


@pytest.mark.parametrize("override, key", [
    ("model.dtype=float16", "model.dtype"),
    ("model.loss_positions=first", "model.loss_positions"),
])
def test_bad_language_model_keys_are_refused_in_one_line(override, key):
    with pytest.raises(ConfigError, match=key):
        (compose_config(["experiment=shakespeare_lora_dpsgd", override]))


def test_ghost_clipping_in_bfloat16_is_refused():
    with pytest.raises(ConfigError, match="bfloat16.*hooks"):
        (compose_config(["experiment=shakespeare_lora_dpsgd", "model.dtype=bfloat16",
                                 "privacy.local.grad_sample_mode=ghost"]))


# ------------------------------------------------------------------ GPU placement (described GPUs)

V100 = GpuInfo("Tesla V100-SXM2-16GB", 16 * GIB, (7, 0))
A100 = GpuInfo("NVIDIA A100-SXM4-40GB", 40 * GIB, (8, 0))


def fit(**kw):
    args = dict(dtype="float32", workers_gpu_share=0.25, server_on_gpu=False, base_bytes=2 * GIB,
                trainable_numbers=1_000_000, gpus=[A100])
    args.update(kw)
    check_gpu_fit(**args)


def test_workers_that_fit_pass_and_a_cpu_placement_is_not_checked():
    fit()  # 4 workers x (2 GiB + 15 MiB + a context) on 40 GiB
    fit(workers_gpu_share=0.0, base_bytes=100 * GIB)  # workers on CPUs, server too
    fit(gpus=[], workers_gpu_share=0.1, base_bytes=100 * GIB)  # no GPU here: check_placement refuses that


def test_more_workers_than_a_gpu_holds_are_refused_with_what_fits():
    with pytest.raises(ConfigError, match=r"num_gpus_per_client.*16 language-model workers.*at most 9 workers fit "
                                          r"\(placement.num_gpus_per_client=0.111\).*bfloat16"):
        fit(workers_gpu_share=1 / 16, base_bytes=4 * GIB)
    with pytest.raises(ConfigError, match="and the server.*not even one worker fits"):
        fit(workers_gpu_share=1.0, server_on_gpu=True, base_bytes=30 * GIB)
    fit(workers_gpu_share=1 / 16, base_bytes=2 * GIB, dtype="bfloat16")  # halved: 16 x 2.3 GiB fit in 40


def test_the_smallest_gpu_decides():
    with pytest.raises(ConfigError, match="V100"):
        fit(gpus=[A100, GpuInfo("Tesla V100-SXM2-16GB", 16 * GIB, (8, 0))], workers_gpu_share=0.25, base_bytes=4 * GIB)


def test_bfloat16_on_a_gpu_without_it_is_refused():
    with pytest.raises(ConfigError, match=r"model.dtype.*8.0.*V100.*7.0"):
        fit(dtype="bfloat16", gpus=[V100])
    fit(dtype="float32", gpus=[V100])


def test_preflight_refuses_lora_workers_that_cannot_fit_the_gpu_before_any_work(monkeypatch, tmp_path):
    """The whole path: placement=gpu with 16 workers on a (described) 1 GiB GPU is one line from
    preflight, before Ray; the same placement with 2 workers passes."""
    from fedpriv import preflight as pf
    from fedpriv import simulation

    small = GpuInfo("a 1 GiB GPU", GIB, (8, 6))
    monkeypatch.setattr(simulation, "visible_gpus", lambda: 1)
    monkeypatch.setattr(pf, "visible_gpus", lambda: 1)
    monkeypatch.setattr(pf, "visible_gpu_info", lambda: [small])
    base = ["dataset=shakespeare_lm", "model=transformer", "model.pretrained=null", "privacy=none", "placement=gpu",
            "placement.server_device=cpu", "device=cpu", f"run_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match="16 language-model workers.*a 1 GiB GPU"):
        pf.preflight(compose_config([*base, "placement.num_gpus_per_client=0.0625"]))
    pf.preflight(compose_config([*base, "placement.num_gpus_per_client=0.5"]))
