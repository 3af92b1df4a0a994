"""Inference over the shard adapters: APA's sample-adaptive merge and SISA's prediction average.

Per test row: its `neighbours` most similar validation rows (cosine of the frozen base model's
mean-pooled last hidden state of the prompts), each shard adapter's mean log loss on them, and the
weights w = softmax(-tau * loss) over the adapters. The K adapters sit stacked in one model
(`fedsim.models.fused.FusedLoRA`, its layers `fedsim.models.routing.StackedLoRALinear`); a batch of
rows runs one forward with per-row weights: merge `weights` mixes the factors, (sum w B)(sum w A) x
(APA's D merge), `outputs` mixes the adapters' outputs, sum w B A x (APA's ND merge). The single
shard predictions (each adapter alone, which the weights and SISA need) are one-hot routes of the
same model.

Scores are kept (`ScoreCache`): each shard adapter's p(Yes) per prompt in its shard's directory, and
the base model's hidden states per prompt in the run's. A deletion leaves an untouched shard's
adapter as it was, so the re-merge scores only the retrained shards plus the two merged forwards,
and a merge cut short resumes with the shards it had scored.
"""
from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedsim.core.files import atomic_write
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


class ScoreCache:
    """Values per prompt ([rows, d] floats) for one model, in one .npz file: found by the sha256 of
    the prompt's text, so a row whose prompt changed is scored again; `tag` names the model (an
    adapter file's sha256, the base model's path) and a file of another tag is ignored. Also keeps
    the seconds per row the values took, so the timing of a merge survives its reuse."""

    def __init__(self, path: Path, tag: str):
        self.path, self.tag = Path(path), tag

    @staticmethod
    def keys(texts: list[str]) -> np.ndarray:
        return np.array([hashlib.sha256(t.encode()).hexdigest() for t in texts])

    def _read(self):
        if not self.path.exists():
            return None
        with np.load(self.path, allow_pickle=False) as z:
            if str(z["tag"]) != self.tag:
                return None
            return z["keys"], z["values"], float(z["seconds_per_row"])

    def get(self, texts: list[str]) -> tuple[np.ndarray, float] | None:
        """(values of these prompts, seconds per row) when every one is kept, else None."""
        got = self._read()
        if got is None:
            return None
        keys, values, seconds = got
        where = dict(zip(keys.tolist(), range(len(keys))))
        idx = [where.get(k) for k in self.keys(texts)]
        if any(i is None for i in idx):
            return None
        return values[np.array(idx, dtype=np.int64)].reshape(len(texts), -1), seconds

    def drop(self, texts: list[str]) -> None:
        """Forget these prompts' values (a deletion: no score of a deleted row is kept)."""
        got = self._read()
        if got is None:
            return
        keep = ~np.isin(got[0], self.keys(texts))
        if not keep.all():
            self._write(got[0][keep], got[1][keep], got[2])

    def _write(self, keys: np.ndarray, values: np.ndarray, seconds_per_row: float) -> None:
        buf = io.BytesIO()
        np.savez(buf, tag=np.array(self.tag), keys=keys, values=values, seconds_per_row=np.array(seconds_per_row))
        atomic_write(self.path, lambda f: f.write(buf.getvalue()))

    def put(self, texts: list[str], values: np.ndarray, seconds_per_row: float) -> None:
        keys, values = self.keys(texts), np.asarray(values).reshape(len(texts), -1)
        got = self._read()
        if got is not None and got[1].shape[1] == values.shape[1]:
            old = ~np.isin(got[0], keys)
            keys, values = np.concatenate([got[0][old], keys]), np.concatenate([got[1][old], values])
        self._write(keys, values, seconds_per_row)


def cached(cache: ScoreCache | None, texts: list[str], compute) -> tuple[np.ndarray, float]:
    """(values [rows, d], seconds per row): kept ones, or `compute()` -> (values, seconds) kept now."""
    hit = cache.get(texts) if cache is not None else None
    if hit is not None:
        return hit
    t0 = time.perf_counter()
    values = np.asarray(compute()).reshape(len(texts), -1)
    seconds = (time.perf_counter() - t0) / max(1, len(texts))
    if cache is not None and len(texts):
        cache.put(texts, values, seconds)
    return values, seconds


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
                   log=print, caches: list[ScoreCache] | None = None,
                   hidden_cache: ScoreCache | None = None) -> tuple[dict, pd.DataFrame]:
    """Scores of `test` by every shard alone, SISA's average, APA's two merges: (metrics, per-row
    predictions). Metrics: shard/<k>/auc, shard_auc_mean, sisa/auc, apa_weights/auc,
    apa_outputs/auc (each with its 95 % bootstrap interval), and seconds per row of a single
    adapter's forward and of a merged one. `caches` (one per adapter) and `hidden_cache` keep and
    reuse each adapter's scores and the base model's hidden states (`ScoreCache`)."""
    u, seed = cfg.unlearning, cfg.train.seed
    m = ShardModel(cfg, model_path, adapters)
    K = len(adapters)
    yt = test["label"].to_numpy()
    tv, tt = prompts(cfg, valid), prompts(cfg, test)

    def single(k, rows, texts):  # (p [rows], seconds per row) of adapter k alone
        p, s = cached(caches[k] if caches else None, texts, lambda: m.predict(rows, shard=k)[0])
        return p[:, 0], s

    if K == 1:  # one adapter (plain retraining): every merge is that adapter, no neighbours to weigh
        log(f"merge: one adapter, scoring {len(test)} test rows")
        singles = [single(0, test, tt)]
        w = np.ones((len(test), 1))
        (p_w, s_w), (p_o, s_o) = singles[0], singles[0]
    else:
        log(f"merge: hidden states of {len(valid)} valid and {len(test)} test rows")
        ev = cached(hidden_cache, tv, lambda: m.embed(valid))[0]
        et = cached(hidden_cache, tt, lambda: m.embed(test))[0]
        todo = [k for k in range(K) if not caches or caches[k].get(tv) is None or caches[k].get(tt) is None]
        if len(todo) < K:
            log(f"merge: shards {[k for k in range(K) if k not in todo]} kept their scores; {len(todo)} score the rows")
        yv = valid["label"].to_numpy()
        pv, singles, t0 = [], [], time.perf_counter()
        for k in range(K):  # each adapter alone on the valid rows (the weights) and the test rows
            pv.append(single(k, valid, tv)[0])
            singles.append(single(k, test, tt))
            if k in todo:
                done, spent = todo.index(k) + 1, time.perf_counter() - t0
                log(f"merge: {done}/{len(todo)} adapters scored ({spent:.0f} s, "
                    f"about {spent / done * (len(todo) - done):.0f} s to go)")
        pv = np.stack(pv, 1)
        w = neighbour_weights(et, ev, row_losses(pv, yv), u.neighbours, u.tau)
        p_w, s_w = m.predict(test, weights=w, factors=True)
        p_o, s_o = m.predict(test, weights=w, factors=False)
        s_w, s_o = s_w / max(1, len(test)), s_o / max(1, len(test))
    pt = np.stack([p for p, _ in singles], 1)
    p_sisa = pt.mean(1)
    out = {}
    for k in range(K):
        out.update({f"shard/{k}/{n}": v for n, v in _auc(yt, pt[:, k], seed).items()})
    out["shard_auc_mean"] = float(np.mean([out[f"shard/{k}/auc"] for k in range(K)]))
    for name, p in (("sisa", p_sisa), ("apa_weights", p_w), ("apa_outputs", p_o)):
        out.update({f"{name}/{n}": v for n, v in _auc(yt, p, seed).items()})
    chosen = p_w if u.merge == "weights" else p_o
    out.update(_auc(yt, chosen, seed))
    out.update({"seconds_per_row_single": float(np.mean([s for _, s in singles])),
                "seconds_per_row_weights": s_w, "seconds_per_row_outputs": s_o,
                "weight_entropy": float(-(w * np.log(np.clip(w, 1e-12, None))).sum(1).mean()), "rows": float(len(test))})
    preds = test[["user", "item", "timestamp", "client", "label"]].reset_index(drop=True).assign(
        prob=chosen, prob_weights=p_w, prob_outputs=p_o, prob_sisa=p_sisa,
        **{f"prob_shard_{k}": pt[:, k] for k in range(K)})
    return out, preds
