"""A fresh executor model scores deterministically: LoRA dropout is off until training turns it on."""
import torch

from fedsim.config import LoraConfig
from fedsim.models.loader import build_tiny_random, load_base
from fedsim.models.lora import attach_lora, get_flat, set_flat, trainable


def test_a_fresh_lora_model_is_in_eval_mode(tmp_path):
    path = build_tiny_random(tmp_path / "tiny", ["yes no a b c d"], seed=0)
    base, tok = load_base(str(path), "float32")
    model = attach_lora(base, LoraConfig(r=4, alpha=8, dropout=0.5, target_modules=["q_proj", "v_proj"]), 0)
    assert not model.training and not any(m.training for m in model.modules())
    params = trainable(model)
    set_flat(params, torch.randn(get_flat(params).numel()))  # B != 0, so dropout would show
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
