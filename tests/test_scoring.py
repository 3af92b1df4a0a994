"""p(Yes) scoring on a real (tiny, random) Llama with a real tokenizer."""
import pytest
import torch

from fedsim.data.prompt import render_prompt
from fedsim.models.loader import build_tiny_random, load_base
from fedsim.models.scoring import answer_token_ids, encode, p_yes, preference_loss, yes_no_logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    texts = ["Heat", "Toy Story", "Alien", "Fargo", "Casablanca", render_prompt([], [], "x")]
    path = build_tiny_random(tmp_path_factory.mktemp("m") / "model", texts, seed=0)
    return load_base(str(path), "float32")


def test_answer_ids_come_from_the_tokenizer(tiny):
    _, tok = tiny
    yes, no = answer_token_ids(tok)
    assert tok.convert_ids_to_tokens([yes, no]) == ["Yes", "No"]


def test_p_yes_is_the_two_way_softmax_of_the_lm_logits(tiny):
    model, tok = tiny
    yes, no = answer_token_ids(tok)
    prompts = [render_prompt(["Heat", "Alien"], ["Fargo"], "Toy Story"), render_prompt([], ["Heat"], "Casablanca")]
    batch = encode(tok, prompts, 128, "cpu")
    with torch.no_grad():
        got = p_yes(yes_no_logits(model, batch, yes, no))
        for i, prompt in enumerate(prompts):
            ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            full = model(input_ids=ids).logits[0, -1]
            want = torch.softmax(full[[yes, no]], -1)[0]
            # The second prompt is shorter, so it was right-padded in the batch: padding must not matter.
            assert got[i].item() == pytest.approx(want.item(), abs=1e-5)


def test_truncation_keeps_the_answer_position(tiny):
    _, tok = tiny
    long = render_prompt(["Heat"] * 200, [], "Alien")
    batch = encode(tok, [long], 32, "cpu")
    assert batch["input_ids"].shape[1] == 32
    assert tok.decode(batch["input_ids"][0, -1:]).strip() == ":"  # "Answer:" ends the row


def test_loss_targets_yes_for_liked_items():
    logits = torch.tensor([[4.0, -4.0], [4.0, -4.0]])
    assert preference_loss(logits, torch.tensor([1, 1])) < 0.01
    assert preference_loss(logits, torch.tensor([0, 0])) > 7
