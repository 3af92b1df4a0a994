"""Inference over the shard adapters: APA's sample-adaptive merge and SISA's prediction average.

Per test row: its `neighbours` most similar validation rows (cosine of the frozen base model's
mean-pooled last hidden state of the prompts), each shard adapter's mean log loss on them, and the
weights w = softmax(-tau * loss) over the adapters. The K adapters sit stacked in one model
(`fedsim.models.fused.FusedLoRA`, its layers `fedsim.models.routing.StackedLoRALinear`); a batch of
rows runs one forward with per-row weights: merge `weights` mixes the factors, (sum w B)(sum w A) x
(APA's D merge), `outputs` mixes the adapters' outputs, sum w B A x (APA's ND merge). The single
shard predictions (each adapter alone, which the weights and SISA need) are one-hot routes of the
same model.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from fedsim.data.prompt import prompt_template, render_prompts
from fedsim.metrics import auc, auc_ci
from fedsim.models.fused import FusedLoRA
from fedsim.models.loader import load_base, quiet_transformers
from fedsim.models.lora import attach_lora, trainable
from fedsim.models.scoring import answer_token_ids, causal_lm, encode, p_yes, yes_no_logits


def prompts(cfg, rows: pd.DataFrame) -> list[str]:
    return render_prompts(rows, prompt_template(cfg))


@torch.no_grad()
def hidden_states(model, tokenizer, texts: list[str], max_length: int, batch_size: int) -> np.ndarray:
    """[rows, hidden]: the last decoder layer's (normed) hidden state, mean-pooled over each
    prompt's tokens, of the model as it is (call it before attaching LoRA: the frozen base)."""
    lm = causal_lm(model)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        batch = encode(tokenizer, texts[i:i + batch_size], max_length, device)
        h = lm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0].float()
        m = batch["attention_mask"].unsqueeze(-1).float()
        out.append(((h * m).sum(1) / m.sum(1)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def row_losses(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Log loss of each prediction (p [rows, K], y [rows])."""
    p = np.clip(p, 1e-7, 1 - 1e-7)
    y = y[:, None]
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def neighbour_weights(query: np.ndarray, keys: np.ndarray, key_loss: np.ndarray, neighbours: int,
                      tau: float) -> np.ndarray:
    """[queries, K]: softmax(-tau * each adapter's mean loss on the query's `neighbours` nearest
    keys by cosine similarity)."""
    q = query / np.clip(np.linalg.norm(query, axis=1, keepdims=True), 1e-12, None)
    k = keys / np.clip(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12, None)
    n = min(neighbours, len(keys))
    near = np.argsort(-(q @ k.T), axis=1, kind="stable")[:, :n]
    z = -tau * key_loss[near].mean(1)
    z -= z.max(1, keepdims=True)
    w = np.exp(z)
    return w / w.sum(1, keepdims=True)


class ShardModel:
    """The frozen base model with the K shard adapters stacked (peft state dicts, as exported)."""

    def __init__(self, cfg, model_path: str, adapters: list[dict]):
        from peft import set_peft_model_state_dict

        quiet_transformers()
        self.cfg = cfg
        self.base, self.tokenizer = load_base(model_path, cfg.model.dtype)
        self.yes_id, self.no_id = answer_token_ids(self.tokenizer)
        self.embedded = False
        self.adapters = adapters
        self.model = None
        self._set = set_peft_model_state_dict

    def embed(self, rows: pd.DataFrame) -> np.ndarray:
        if self.model is not None:
            raise RuntimeError("embed before the adapters are attached: the base model's hidden states")
        return hidden_states(self.base, self.tokenizer, prompts(self.cfg, rows), self.cfg.model.max_length,
                             self.cfg.eval.batch_size)

    def _attach(self) -> None:
        if self.model is not None:
            return
        self.model = attach_lora(self.base, self.cfg.model.lora, self.cfg.train.seed).eval()
        params = trainable(self.model)
        self.fused = FusedLoRA(self.model, len(self.adapters), params)
        for k, state in enumerate(self.adapters):
            self._set(self.model, state)
            self.fused.load(k)

    @torch.no_grad()
    def predict(self, rows: pd.DataFrame, weights: np.ndarray | None = None, shard: int | None = None,
                factors: bool = False) -> tuple[np.ndarray, float]:
        """(p(Yes) per row, seconds): through shard `shard` alone, or mixed per row by `weights`."""
        self._attach()
        K, bs = len(self.adapters), self.cfg.eval.batch_size
        texts = prompts(self.cfg, rows)
        out = np.zeros(len(rows))
        t0 = time.perf_counter()
        with self.fused.installed():
            for i in range(0, len(rows), bs):
                n = min(bs, len(rows) - i)
                if shard is not None:
                    self.fused.route.set([n if c == shard else 0 for c in range(K)])
                else:
                    self.fused.route.set_weights(torch.tensor(weights[i:i + n], dtype=torch.float32), factors)
                batch = encode(self.tokenizer, texts[i:i + n], self.cfg.model.max_length, self.fused.route.device)
                out[i:i + n] = p_yes(yes_no_logits(self.model, batch, self.yes_id, self.no_id)).cpu().numpy()
        return out, time.perf_counter() - t0


def _auc(y, p, seed) -> dict:
    low, high = auc_ci(y, p, seed=seed)
    return {"auc": auc(y, p), "auc_ci_low": low, "auc_ci_high": high}


def evaluate_merge(cfg, model_path: str, adapters: list[dict], valid: pd.DataFrame, test: pd.DataFrame,
                   log=print) -> tuple[dict, pd.DataFrame]:
    """Scores of `test` by every shard alone, SISA's average, APA's two merges: (metrics, per-row
    predictions). Metrics: shard/<k>/auc, shard_auc_mean, sisa/auc, apa_weights/auc,
    apa_outputs/auc (each with its 95 % bootstrap interval), and seconds per row of a single
    adapter's forward and of a merged one."""
    u, seed = cfg.unlearning, cfg.train.seed
    m = ShardModel(cfg, model_path, adapters)
    K = len(adapters)
    yt = test["label"].to_numpy()
    if K == 1:  # one adapter (plain retraining): every merge is that adapter, no neighbours to weigh
        log(f"merge: one adapter, scoring {len(test)} test rows")
        singles = [m.predict(test, shard=0)]
        pt = singles[0][0][:, None]
        w = np.ones((len(test), 1))
        (p_w, s_w), (p_o, s_o) = singles[0], singles[0]
    else:
        log(f"merge: hidden states of {len(valid)} valid and {len(test)} test rows")
        ev, et = m.embed(valid), m.embed(test)
        yv = valid["label"].to_numpy()
        pv = np.stack([m.predict(valid, shard=k)[0] for k in range(K)], 1)
        singles = [m.predict(test, shard=k) for k in range(K)]
        pt = np.stack([p for p, _ in singles], 1)
        w = neighbour_weights(et, ev, row_losses(pv, yv), u.neighbours, u.tau)
        p_w, s_w = m.predict(test, weights=w, factors=True)
        p_o, s_o = m.predict(test, weights=w, factors=False)
    p_sisa = pt.mean(1)
    out = {}
    for k in range(K):
        out.update({f"shard/{k}/{n}": v for n, v in _auc(yt, pt[:, k], seed).items()})
    out["shard_auc_mean"] = float(np.mean([out[f"shard/{k}/auc"] for k in range(K)]))
    for name, p in (("sisa", p_sisa), ("apa_weights", p_w), ("apa_outputs", p_o)):
        out.update({f"{name}/{n}": v for n, v in _auc(yt, p, seed).items()})
    chosen = p_w if u.merge == "weights" else p_o
    out.update(_auc(yt, chosen, seed))
    rows = max(1, len(test))
    out.update({"seconds_per_row_single": float(np.mean([s for _, s in singles])) / rows,
                "seconds_per_row_weights": s_w / rows, "seconds_per_row_outputs": s_o / rows,
                "weight_entropy": float(-(w * np.log(np.clip(w, 1e-12, None))).sum(1).mean()), "rows": float(len(test))})
    preds = test[["user", "item", "timestamp", "client", "label"]].reset_index(drop=True).assign(
        prob=chosen, prob_weights=p_w, prob_outputs=p_o, prob_sisa=p_sisa,
        **{f"prob_shard_{k}": pt[:, k] for k in range(K)})
    return out, preds
