"""Preference scoring: p(Yes) = softmax over the " Yes" / " No" logits at the answer position.

Only the two answer rows of the LM head are computed: the full-vocabulary logits are not needed
for the score nor for the loss, and on a 49k vocabulary they would cost ~10 % of the forward.
Rows are right-padded and the answer position is gathered per row, so a row's score does not
depend on what it is batched with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """Ids of the first token of " Yes" and " No" as this tokenizer splits them after "Answer:"."""
    ids = []
    for word in (" Yes", " No"):
        toks = tokenizer.encode(word, add_special_tokens=False)
        if not toks:
            raise ValueError(f"tokenizer produces no token for {word!r}")
        ids.append(toks[0])
    if ids[0] == ids[1]:
        raise ValueError(f"tokenizer maps ' Yes' and ' No' to the same first token {ids[0]}")
    return ids[0], ids[1]


def encode(tokenizer, prompts: list[str], max_length: int, device) -> dict[str, torch.Tensor]:
    # Truncate from the left: the end of the prompt holds the target item and "Answer:".
    tokenizer.truncation_side = "left"
    tokenizer.padding_side = "right"
    enc = tokenizer(prompts, padding=True, truncation=True, max_length=max_length,
                    add_special_tokens=False, return_tensors="pt")
    last = enc["attention_mask"].sum(1) - 1
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
            "last": last.to(device)}


def causal_lm(model):
    # peft wraps the causal LM; the LoRA layers are injected into it in place.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def yes_no_logits(model, batch: dict, yes_id: int, no_id: int) -> torch.Tensor:
    """(B, 2) logits of [Yes, No] at each row's answer position."""
    lm = causal_lm(model)
    hidden = lm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    return answer_logits(lm, hidden, batch["last"], yes_id, no_id)


def answer_logits(lm, hidden: torch.Tensor, last: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """(B, 2) [Yes, No] logits from the final (normed) hidden states at each row's `last` position."""
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    head = lm.get_output_embeddings()
    w = head.weight[[yes_id, no_id]]
    logits = h @ w.T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[[yes_id, no_id]]
    return logits.float()


def preference_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # Class 0 is "Yes": a liked item's target is index 0.
    return F.cross_entropy(logits, (1 - labels).long(), reduction=reduction)


def p_yes(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1)[:, 0]
