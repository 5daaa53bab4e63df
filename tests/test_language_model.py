"""Language models: a tiny transformer saved with save_pretrained and loaded through model.pretrained
(no hub), LoRA adapters as the only thing that trains and travels, bad checkpoints refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import shared_data_dir
from fedpriv import run_folder
from fedpriv.compose import compose_config
from fedpriv.data.text import PAD_ID, TOKENIZER_FILE, character_tokenizer, encode_padded, train_bpe
from fedpriv.errors import ConfigError

SENT140 = shared_data_dir()
needs_sent140 = pytest.mark.skipif(
    SENT140 is None or not (SENT140 / "sent140").is_dir(),
    reason="Sentiment140 not found: set FEDPRIV_DATA to a folder with sent140/ (CI uses ../shared/data)")


def save_tiny_llama(folder, *, vocab_size=2000, positions=64, layers=1, dim=32, heads=2, tokenizer=None, seed=3):
    """A causal LM written by transformers itself, as a user's checkpoint would be."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=positions,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    if tokenizer is not None:
        (folder / TOKENIZER_FILE).write_text(tokenizer)
    return model


def sent140(*overrides):
    return compose_config(["dataset=sent140", *overrides])


# ------------------------------------------------------------------ tokenisation (no data needed)


def test_padded_ids_end_with_one_eos_and_pad_with_zero():
    tok = train_bpe(["good morning", "bad night", "good night all"] * 5, 300)
    ids = encode_padded(tok, ["good night", "a " * 100], 8)
    eos = json.loads(tok)["added_tokens"][2]
    assert eos["content"] == "[EOS]"
    for row in ids:
        real = row[row != PAD_ID]
        assert real[-1] == eos["id"] and (real == eos["id"]).sum() == 1
        assert (row[len(real):] == PAD_ID).all()  # right padding only
    assert (ids[1] != PAD_ID).all()  # a long text is cut to the length, its [EOS] kept


def test_character_tokenizer_gives_the_shakespeare_ids():
    from tokenizers import Tokenizer

    from fedpriv.data import shakespeare as shk

    tok = Tokenizer.from_str(character_tokenizer(shk.VOCAB))
    text = "To be, or not\nto be: \u2014 that"
    assert tok.encode(text).ids == shk.encode(text).tolist()  # 0 for the em dash, as the data set has it


# ------------------------------------------------------------------ the model (Sentiment140 for the vocabulary)


@needs_sent140
def test_only_the_adapters_and_the_head_travel():
    from fedpriv.task import new_model

    model = new_model(sent140())
    state = model.state_dict()
    # By hand: 2 layers x (q_proj, v_proj) x (A: rank x 64, B: 64 x rank), rank 4, plus the 64 x 2 head.
    assert sum(v.numel() for v in state.values()) == 2 * 2 * (4 * 64 + 64 * 4) + 64 * 2
    assert all("lora_" in k or "modules_to_save" in k for k in state)
    assert model.full_model_parameters() == sum(p.numel() for p in model.network.get_base_model().parameters()) \
        - 2 * 2 * (4 * 64 + 64 * 4) - 64 * 2  # the base without the adapters and the head's trainable copy
    with pytest.raises(RuntimeError, match="does not fit"):
        model.load_state_dict({**state, "extra": torch.zeros(1)})


@needs_sent140
def test_the_frozen_base_is_shared_deterministic_and_untouched_by_training():
    from clients.training import train
    from fedpriv.language_model import base_fingerprint, build_config_model
    from fedpriv.task import dataset_for, language_model_spec, new_model

    rc = sent140()
    a, b = new_model(rc), new_model(rc)
    frozen_a = [p for p in a.parameters() if not p.requires_grad]
    assert all(any(p is q for q in b.parameters()) for p in frozen_a)  # one copy per process
    spec = language_model_spec(rc, dataset_for(rc))
    torch.manual_seed(rc.seed)
    rebuilt = build_config_model(spec)  # what another process builds from the same config and seed
    base = a.network.get_base_model()
    for name, p in rebuilt.named_parameters():
        key = name if not name.startswith("score") else None
        if key:
            assert torch.equal(p, base.get_parameter(name.replace("q_proj.", "q_proj.base_layer.")
                                                     .replace("v_proj.", "v_proj.base_layer."))), name
    before = base_fingerprint(a)
    ds = dataset_for(rc)
    adapters = {k: v.clone() for k, v in a.state_dict().items()}
    train(a, ds.x_train[:64], ds.y_train[:64], epochs=1, batch_size=8, lr=0.5)
    assert base_fingerprint(a) == base_fingerprint(b) == before
    assert any(not torch.equal(adapters[k], v) for k, v in a.state_dict().items())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in adapters.items())  # b's adapters are its own


@needs_sent140
def test_a_saved_checkpoint_loads_through_model_pretrained(tmp_path):
    from fedpriv.data import load_dataset
    from fedpriv.task import dataset_for, new_model

    default = load_dataset("sent140")
    saved = save_tiny_llama(tmp_path, tokenizer=default.tokenizer)
    rc = compose_config(["dataset=sent140", "model=transformer", f"model.pretrained={tmp_path}"])
    model = new_model(rc)
    base = model.network.get_base_model()
    for name, p in saved.model.named_parameters():  # the checkpoint's own weights, frozen
        loaded = base.model.get_parameter(name.replace("q_proj.", "q_proj.base_layer.").replace("v_proj.", "v_proj.base_layer."))
        assert torch.equal(p, loaded) and not loaded.requires_grad, name
    assert sum(v.numel() for v in model.state_dict().values()) == 1 * 2 * (4 * 32 + 32 * 4) + 32 * 2
    logits = model(torch.from_numpy(np.array(dataset_for(rc).x_test[:5])))
    assert logits.shape == (5, 2) and torch.isfinite(logits).all()


@needs_sent140
def test_a_checkpoints_own_tokenizer_makes_the_ids(tmp_path):
    from fedpriv.data import load_dataset
    from fedpriv.data.sent140 import public_pool
    from fedpriv.task import dataset_for

    own = train_bpe(public_pool()[0], 500)
    save_tiny_llama(tmp_path, vocab_size=500, tokenizer=own)
    ds = dataset_for(compose_config(["dataset=sent140", f"model.pretrained={tmp_path}"]))
    assert ds.tokenizer == own and ds.vocab_size == 500 and ds.x_train.max() < 500
    assert ds.x_train.shape == load_dataset("sent140").x_train.shape  # the same tweets, other ids


@needs_sent140
@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("not_a_model", "not a Hugging Face model folder"),
    ("small_vocabulary", "embeds 100 token ids but the data's tokenizer makes 2000"),
    ("short_positions", "takes at most 16 positions, the data has sequences of 48"),
    ("other_tokenizer", "is not the one this data set's ids come from"),
])
def test_a_bad_checkpoint_is_refused_in_one_line(tmp_path, case, message):
    from fedpriv.data import load_dataset
    from fedpriv.preflight import preflight

    folder = tmp_path / "ckpt"
    tokenizer = load_dataset("sent140").tokenizer
    if case == "not_a_model":
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"\0" * 8)
    elif case == "small_vocabulary":
        save_tiny_llama(folder, vocab_size=100)
    elif case == "short_positions":
        save_tiny_llama(folder, positions=16, tokenizer=tokenizer)
    elif case == "other_tokenizer":  # shakespeare is never re-tokenised: a BPE checkpoint cannot read its ids
        save_tiny_llama(folder, vocab_size=2000, positions=128, tokenizer=tokenizer)
    dataset = "shakespeare" if case == "other_tokenizer" else "sent140"
    extra = ["model=transformer", "num_clients=1078"] if dataset == "shakespeare" else []
    rc = compose_config([f"dataset={dataset}", *extra, f"model.pretrained={folder}", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="model.pretrained") as err:
        preflight(rc)
    assert message in str(err.value) and "\n" not in str(err.value)


@needs_sent140
def test_lora_targets_that_do_not_exist_are_refused_naming_the_real_ones(tmp_path):
    from fedpriv.preflight import preflight

    with pytest.raises(ConfigError, match="model.lora_targets.*no linear module named c_attn.*q_proj"):
        preflight(sent140("model.lora_targets=[q_proj,c_attn]", f"run_dir={tmp_path}"))


def test_sizes_beside_a_checkpoint_are_refused():
    with pytest.raises(ConfigError, match="model.layers.*not read with model.pretrained"):
        compose_config(["dataset=sent140", "model.pretrained=/x", "model.layers=4"])
    with pytest.raises(ConfigError, match="model.pretrained.*model=transformer"):
        compose_config(["dataset=digits", "model.pretrained=/x"])


# ------------------------------------------------------------------ DP on the adapters


def _tiny_text_model():
    """A one-layer Llama classifier with LoRA, built as fedpriv builds it (no data set needed)."""
    from fedpriv.language_model import LanguageModelSpec, new_language_model

    spec = LanguageModelSpec(task="text_classification", vocab_size=50, seq_len=12, num_classes=2, pretrained=None,
                             layers=1, dim=16, heads=2, finetune="lora", lora_rank=2, lora_alpha=4.0,
                             lora_targets=("q_proj", "v_proj"), seed=1)
    return new_language_model(spec)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_sgd_on_lora_computes_the_clipped_mean_of_the_adapters_gradients(mode):
    """Noise 0, q = 1: one Opacus step on the adapters equals per-example adapter gradients, each
    clipped by hand to 0.5, averaged; the frozen base does not move."""
    from clients.dp_sgd import train_dp_sgd

    rng = np.random.default_rng(5)
    x = rng.integers(3, 50, size=(10, 12))
    x[:, 8:] = PAD_ID  # padded tails, masked out of attention
    y = rng.integers(0, 2, 10)
    reference, model = _tiny_text_model(), _tiny_text_model()
    model.load_state_dict(reference.state_dict())
    with torch.no_grad():  # B starts at zero in LoRA: move it so that A's gradient is not zero too
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    model.load_state_dict(reference.state_dict())
    trainable = [p for p in reference.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in trainable]
    for i in range(len(x)):
        reference.zero_grad()
        F_loss = torch.nn.functional.cross_entropy(reference(torch.from_numpy(x[i:i + 1])), torch.tensor(y[i:i + 1]))
        F_loss.backward()
        grads = [p.grad.detach().clone() for p in trainable]
        factor = min(1.0, 0.5 / (float(torch.sqrt(sum((g ** 2).sum() for g in grads))) + 1e-6))
        for t, g in zip(total, grads):
            t += factor * g
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = train_dp_sgd(model, x, y, epochs=1, batch_size=10, lr=1.0, noise_multiplier=0.0, max_grad_norm=0.5,
                          grad_sample_mode=mode, max_physical_batch_size=4, sampling_seed=1, noise_seed=1)
    assert result.steps == 1 and result.examples_seen == 10
    after = dict(result.model.named_parameters())
    for (name, p0), t in zip([(n, p) for n, p in reference.named_parameters() if p.requires_grad], total):
        torch.testing.assert_close(after[name].detach(), p0.detach() - t / 10, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(after[n], p) for n, p in frozen_before.items())


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_an_empty_poisson_batch_on_lora_is_a_noise_only_step(mode):
    """A transformer cannot run on 0 rows (CI caught a DP-SGD client failing on a user's empty Poisson
    batch): the step releases noise alone, every adapter moves, the frozen base does not."""
    from clients.dp_sgd import train_dp_sgd

    x, y = np.full((2, 12), 5, np.int64), np.zeros(2, np.int64)
    for seed in range(200):  # a sampling seed whose two Poisson batches over 2 rows (q = 1/2) are both empty
        model = _tiny_text_model()
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        r = train_dp_sgd(model, x, y, epochs=1, batch_size=1, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0,
                         grad_sample_mode=mode, sampling_seed=seed, noise_seed=0)
        if r.examples_seen == 0:
            break
    assert r.empty_batches == 2 and r.steps == 2
    for n, p in r.model.named_parameters():
        assert torch.equal(p, start[n]) != p.requires_grad, n  # adapters and head moved (noise), base did not


@needs_sent140
def test_central_user_level_dp_on_the_adapters_reports_dp_accountings_epsilon(tmp_path, flower_run_identity):
    """Sent140 users as clients, LoRA adapter deltas clipped and noised: the run's epsilon against an
    independent PLD computation, and every round's model is adapters only."""
    from conftest import InProcessGrid
    from dp_accounting import dp_event, pld

    from fedpriv.federation import run_federation

    rc = compose_config(["dataset=sent140", "clients_per_round=8", "num_rounds=2", "privacy=central",
                         "privacy.noise_multiplier=0.8", "privacy.target_epsilon=null", "privacy.delta=1e-5",
                         "train.lr=0.1", "tracking.progress=false", f"run_dir={tmp_path}"])
    summary = run_federation(InProcessGrid(2), rc)
    raw = run_folder.read_jsonl(tmp_path / run_folder.DIAGNOSTICS)  # operator-only: clients per round
    assert all(r["num_clients"] >= 1 and r["num_failed"] == 0 for r in raw)  # real users trained
    acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_event.PoissonSampledDpEvent(8 / 2315, dp_event.GaussianDpEvent(0.8)), 2)
    independent = acc.get_epsilon(1e-5)
    assert independent * 0.999 <= summary["epsilon"] <= independent * 1.02
    assert json.loads((tmp_path / "privacy.json").read_text())["epsilon"] == summary["epsilon"]
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert sum(v.numel() for v in saved.values()) == 2 * 2 * (4 * 64 + 64 * 4) + 64 * 2  # adapters and head


@needs_sent140
def test_local_dp_sgd_on_the_adapters_composes_each_users_epsilon(tmp_path, flower_run_identity):
    """Example-level DP-SGD on each user's tweets with Opacus on the LoRA parameters: each client's
    epsilon over its rounds against an independent RDP computation of its own plan."""
    from conftest import InProcessGrid
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    from fedpriv.federation import run_federation
    from fedpriv.privacy.local import sampling_plan
    from fedpriv.task import load_client_data

    rc = compose_config(["dataset=sent140", "clients_per_round=6", "num_rounds=2", "privacy=local",
                         "privacy.local.target_epsilon=null", "privacy.local.noise_multiplier=1.2",
                         "privacy.local.delta=1e-3", "privacy.accountant=rdp", "train.batch_size=4",
                         "tracking.progress=false", f"run_dir={tmp_path}"])
    run_federation(InProcessGrid(2), rc)
    rounds = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["num_failed"] == 0 for r in rounds) and sum(r["num_clients"] for r in rounds) >= 1
    table = json.loads((tmp_path / "privacy.json").read_text())["local"]["clients"]
    assert table
    for row in table:  # every user that trained: its own plan, composed over the rounds it took part in
        cid = int(row["client_id"].removeprefix("client-"))
        plan = sampling_plan(len(load_client_data(rc, cid).x_train), 4, 1)
        acc = rdp_privacy_accountant.RdpAccountant()
        acc.compose(dp_event.PoissonSampledDpEvent(plan.sample_rate, dp_event.GaussianDpEvent(1.2)),
                    row["rounds_participated"] * plan.steps)
        assert row["steps"] == row["rounds_participated"] * plan.steps
        assert row["epsilon"] == pytest.approx(acc.get_epsilon(1e-3), rel=1e-6)


# ------------------------------------------------------------------ public pretraining


@needs_sent140
def test_sent140_splits_users_never_tweets_and_the_tokenizer_sees_only_the_public_pool():
    from fedpriv.data import load_dataset, sent140

    raw = json.loads(sent140.find_file(None).read_text())
    ds = load_dataset("sent140")
    clients = set(ds.natural_names)
    assert len(raw["users"]) == 2875 and 2000 < len(clients) < 2600
    tweets = {u: len(raw["user_data"][u]["y"]) for u in raw["users"]}
    assert len(ds.y_train) == sum(tweets[u] for u in clients)  # every tweet of every client user, nobody else's
    test_users = [u for u in raw["users"] if sent140.pool_of(u) == "test"]
    assert not clients & set(test_users)
    assert len(ds.y_test) == sum(tweets[u] for u in test_users) > 0  # held-out users, all their tweets
    public = [sent140.normalise(r[4]) for u in raw["users"] if sent140.pool_of(u) == "public"
              for r in raw["user_data"][u]["x"]]
    assert not any(sent140.pool_of(u) == "public" for u in clients)
    assert sent140.default_tokenizer() == train_bpe(public, sent140.VOCAB_SIZE)  # public text only


@needs_sent140
def test_a_public_checkpoint_is_written_loaded_and_built_once(tmp_path, monkeypatch):
    from fedpriv import pretraining
    from fedpriv.data import load_dataset
    from fedpriv.task import new_model

    report = pretraining.write_checkpoint(tmp_path / "ckpt", "sent140", epochs=1, layers=1, dim=32, heads=2)
    assert report["objective"] == "classify" and report["privacy"].startswith("none: public data only")
    assert (tmp_path / "ckpt" / TOKENIZER_FILE).read_text() == load_dataset("sent140").tokenizer
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt", local_files_only=True)
    model = new_model(compose_config(["dataset=sent140", f"model.pretrained={tmp_path / 'ckpt'}"]))
    head = model.state_dict()["network.base_model.model.score.modules_to_save.default.weight"]
    assert torch.equal(head, saved.score.weight)  # fine-tuning starts from the public classifier's head

    calls = []

    def fake_write(out, dataset, **sizes):
        calls.append(dataset)
        save_tiny_llama(out, vocab_size=2000, layers=sizes["layers"], dim=sizes["dim"], heads=sizes["heads"])
        (out / pretraining.REPORT).write_text("{}")

    monkeypatch.setenv("FEDPRIV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretraining, "write_checkpoint", fake_write)
    first = pretraining.public_checkpoint("sent140", layers=1, dim=32, heads=2)
    again = pretraining.public_checkpoint("sent140", layers=1, dim=32, heads=2)
    assert first == again and calls == ["sent140"] and (first / "config.json").is_file()
    with pytest.raises(ConfigError, match="public pretraining exists for sent140, shakespeare_lm"):
        pretraining.public_checkpoint("digits")
