"""A small sequential recommender (DIN-style, target-aware attention over a user's long ID history),
RecLoRA's conventional recommender when `model.personal.crm` is `sequential`.

The history a row's user brings is a list of (item, liked) pairs, at most `length` of them, all
rated strictly before the row (`id_history`). The samples carry only a short *text* history (the
last `data.history_len` titles, what the LLM reads), so the long ID history is rebuilt from the
rows the model is fitted on (a client's own train rows): the user's rows with a timestamp strictly
before the row's, oldest first, then the row's own text-history items mapped back to item ids
(they are earlier than the row's target by construction). A row never sees its own label or a later row.

The model (DIN, Zhou et al. 2018, cut down): x_j = E[item_j] + L[liked_j]; the target item's
embedding e attends over the history, a_j = softmax_j(MLP([x_j, e, x_j * e])); the pooled history
h = sum_j a_j x_j is the user representation (h_u, `DIM` numbers) and
logit = b + b_item[target] + w . h + h . e. It is fitted full-batch (deterministic for a seed, one
thread) with a logistic loss, then frozen.
"""
from __future__ import annotations


import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fedsim.core.threads import single_thread

DIM = 16
EPOCHS = 40
LR = 0.02
WEIGHT_DECAY = 1e-3
ATTENTION_HIDDEN = 8


def _item_of_title(train: pd.DataFrame) -> pd.Series:
    return train.drop_duplicates("title").set_index("title")["item"]


def id_history(train: pd.DataFrame, rows: pd.DataFrame, length: int) -> list[list[tuple[int, int]]]:
    """Each row's long ID history, [(item, liked)] oldest first, at most `length`: the rows of
    `train` of the row's user with a timestamp strictly before the row's, then the row's own text
    history (`liked` / `disliked` titles known in `train`) where not already there."""
    by_user = {u: (g["timestamp"].to_numpy(), g["item"].to_numpy(), g["label"].to_numpy())
               for u, g in train.sort_values(["user", "timestamp", "item"], kind="stable").groupby("user")}
    item_of = _item_of_title(train)
    empty = (np.zeros(0, dtype=np.int64),) * 3
    out = []
    for user, ts, liked, disliked in zip(rows["user"].to_numpy(), rows["timestamp"].to_numpy(),
                                          rows["liked"], rows["disliked"]):
        times, items, labels = by_user.get(user, empty)
        n = np.searchsorted(times, ts, side="left")  # strictly before: not the row itself, nothing later
        pairs = list(zip(items[:n].tolist(), labels[:n].tolist()))
        seen = {i for i, _ in pairs}
        for titles, value in ((liked, 1), (disliked, 0)):
            for t in titles:
                i = item_of.get(t)
                if i is not None and int(i) not in seen:
                    pairs.append((int(i), value))
                    seen.add(int(i))
        out.append(pairs[-length:])
    return out


class SequentialCRM(torch.nn.Module):
    def __init__(self, num_items: int, seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.item = torch.nn.Embedding(num_items + 1, DIM, padding_idx=0)  # 0: padding / unknown
            torch.nn.init.normal_(self.item.weight, std=0.1)
            self.liked = torch.nn.Embedding(2, DIM)
            torch.nn.init.normal_(self.liked.weight, std=0.1)
            self.attention = torch.nn.Sequential(torch.nn.Linear(3 * DIM, ATTENTION_HIDDEN), torch.nn.ReLU(),
                                                 torch.nn.Linear(ATTENTION_HIDDEN, 1))
            self.w = torch.nn.Linear(DIM, 1)  # w . h + b
            self.item_bias = torch.nn.Embedding(num_items + 1, 1, padding_idx=0)
            torch.nn.init.zeros_(self.item_bias.weight)
        with torch.no_grad():
            self.item.weight[0] = 0

    def pooled(self, hist: torch.Tensor, liked: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[rows, DIM]: the history attended by the target (zeros for an empty history)."""
        mask = hist > 0
        # index_select (not Embedding lookups) over the [rows, length] tokens: its backward is a
        # plain scatter-add, several times faster on a CPU than Embedding's. Padding tokens need no
        # masking here: their attention weight is 0.
        x = (self.item.weight.index_select(0, hist.reshape(-1))
             + self.liked.weight.index_select(0, liked.reshape(-1))).view(*hist.shape, DIM)
        e = self.item(target)
        # The MLP's first layer on [x, e, x * e], its weight split by input: e's part once per row.
        first, rest = self.attention[0], self.attention[1:]
        wx, we, wp = first.weight.split(DIM, 1)
        hidden = x @ wx.T + (e @ we.T + first.bias)[:, None] + (x * e[:, None]) @ wp.T
        score = rest(hidden).squeeze(-1).masked_fill(~mask, -1e9)
        a = torch.softmax(score, -1) * mask  # an empty history pools to zero
        return (a[..., None] * x).sum(1)

    def forward(self, hist, liked, target) -> torch.Tensor:
        h = self.pooled(hist, liked, target)
        return (self.w(h).squeeze(-1) + self.item_bias(target).squeeze(-1) + (h * self.item(target)).sum(-1))


def _tensors(m: dict, rows: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(history item indices [rows, length], liked flags, target indices); unknown items -> 0."""
    histories = id_history(m["train"], rows, m["length"])
    hist = np.zeros((len(rows), m["length"]), dtype=np.int64)
    liked = np.zeros_like(hist)
    for r, pairs in enumerate(histories):
        if pairs:
            items, labels = zip(*pairs)
            hist[r, :len(pairs)] = m["items"].get_indexer(list(items)) + 1  # -1 (unknown) -> 0
            liked[r, :len(pairs)] = labels
    target = m["items"].get_indexer(rows["item"].to_numpy()) + 1
    width = max(1, max(map(len, histories), default=0))  # padding past the longest history costs time only
    return (torch.from_numpy(hist[:, :width]), torch.from_numpy(liked[:, :width]),
            torch.from_numpy(target.astype(np.int64)))


def fit_sequential(train: pd.DataFrame, seed: int, length: int, epochs: int = EPOCHS) -> dict:
    """The sequential CRM fitted on `train` (histories from `train` itself), frozen. `epochs` 0:
    the untrained model (a reference for tests)."""
    if length < 1:
        raise ValueError(f"sequential CRM: a history of {length} items")
    items = pd.Index(train["item"].unique())
    cols = ["user", "item", "timestamp", "label", "title"]
    m = {"train": train[cols].reset_index(drop=True), "items": items, "length": length}
    with single_thread(), torch.enable_grad():  # callers may be inside no_grad (a client evaluated first)
        model = SequentialCRM(len(items), seed)
        hist, liked, target = _tensors(m, train)
        y = torch.tensor(train["label"].to_numpy(), dtype=torch.float32)
        opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        # Full batch: a client's rows fit easily and the result is deterministic. No rows (a client
        # evaluated that has none to train on): the untrained model, not a NaN one.
        for _ in range(epochs if len(train) else 0):
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(model(hist, liked, target), y).backward()
            opt.step()
    m["model"] = model.eval().requires_grad_(False)
    return m


def sequential_scores(m: dict, rows: pd.DataFrame) -> np.ndarray:
    """p(like) of each row under the fitted CRM."""
    with single_thread(), torch.no_grad():
        return torch.sigmoid(m["model"](*_tensors(m, rows))).double().numpy()


def sequential_user_vectors(m: dict, rows: pd.DataFrame) -> torch.Tensor:
    """[rows, DIM]: each row's h_u, its long ID history pooled by attention to its target item."""
    with single_thread(), torch.no_grad():
        return m["model"].pooled(*_tensors(m, rows)).float()
