"""Conventional recommenders fitted centrally on pooled training rows, as reference points."""

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fedsim.core.threads import single_thread
from fedsim.data.samples import SMOOTHING, like_rate
from fedsim.metrics import accuracy, auc, auc_ci, logloss

MF_DIM = 16
MF_EPOCHS = 100
MF_LR = 0.01
MF_WEIGHT_DECAY = 1e-4
FOLD_IN_STEPS = 50
FOLD_IN_LR = 0.05
FOLD_IN_L2 = 1.0
# Settings picked on the MovieLens-100K valid split (valid AUC 0.69 without fold-in, 0.75 with);
# more epochs or weaker decay overfit the ~800 training users.


def _history_share(train: pd.DataFrame, evaluate: pd.DataFrame) -> np.ndarray:
    """Share of liked items in the row's own history window (the same window the LLM reads).

    A per-user rate from train would be useless under the global time split: most evaluated rows
    belong to users who only appear after the train cut-off.
    """
    overall = train["label"].mean()
    liked = evaluate["liked"].map(len).to_numpy(dtype=np.float64)
    seen = liked + evaluate["disliked"].map(len).to_numpy(dtype=np.float64)
    return (liked + SMOOTHING * overall) / (seen + SMOOTHING)


def _index(values, vocab: pd.Index) -> torch.Tensor:
    # Unknown ids map to -1; callers mask them to zero embeddings and biases.
    return torch.from_numpy(vocab.get_indexer(values).astype(np.int64))


ITEM_SIDE = ("q", "bi", "b")  # what a federated MF shares; the user side (p, bu) stays on the client


def _mf_steps(m: dict, train: pd.DataFrame, trained: tuple[str, ...], steps: int) -> None:
    """`steps` full-batch Adam steps on `train` of the parameters named in `trained` (in place)."""
    u, i = _index(train["user"], m["users"]), _index(train["item"], m["items"])
    y = torch.tensor(train["label"].to_numpy(), dtype=torch.float32)
    params = [m[k].requires_grad_() for k in trained]
    opt = torch.optim.Adam(params, lr=MF_LR, weight_decay=MF_WEIGHT_DECAY)
    for _ in range(steps):  # full batch: ~80k rows fit easily and the result is deterministic
        opt.zero_grad()
        logit = m["b"] + m["bu"][u] + m["bi"][i] + (m["p"][u] * m["q"][i]).sum(-1)
        F.binary_cross_entropy_with_logits(logit, y).backward()
        opt.step()
    for k in trained:
        m[k] = m[k].detach()


def _new_users(train: pd.DataFrame, gen: torch.Generator) -> dict:
    users = pd.Index(train["user"].unique())
    return {"users": users, "p": 0.1 * torch.randn(len(users), MF_DIM, generator=gen), "bu": torch.zeros(len(users))}


def _fit_mf(train: pd.DataFrame, seed: int, items: dict | None = None) -> dict:
    """The logistic MF on `train`; with `items` (a shared item side: q, bi, b and their index) only
    the user side is fitted, against those items frozen."""
    gen = torch.Generator().manual_seed(seed)
    m = _new_users(train, gen)
    if items is None:
        index = pd.Index(train["item"].unique())
        m.update({"items": index, "q": 0.1 * torch.randn(len(index), MF_DIM, generator=gen),
                  "bi": torch.zeros(len(index)), "b": torch.zeros(1),
                  "item_of_title": train.drop_duplicates("title").set_index("title")["item"]})
        _mf_steps(m, train, ("p", "q", "bu", "bi", "b"), MF_EPOCHS)
    else:
        m.update({k: items[k] for k in (*ITEM_SIDE, "items", "item_of_title")})
        _mf_steps(m, train, ("p", "bu"), MF_EPOCHS)
    return m


def fit_mf_federated(clients: list[pd.DataFrame], seed: int, rounds: int, local_steps: int) -> dict:
    """FedAvg over the logistic MF's item side (item factors q, item biases bi, the global bias b),
    averaged weighted by rows; each client's user factors and biases never leave it. Every round each
    client starts from the shared item side and its own user side and takes `local_steps` full-batch
    Adam steps (fresh moments: the server sends parameters only). The item index is the union of the
    clients' items (a catalogue, public). Returns the shared item side; a client's users are then
    fitted against it frozen (`fit_mf(train, seed, items=...)`)."""
    with single_thread(), torch.enable_grad():
        gen = torch.Generator().manual_seed(seed)
        catalogue = pd.concat([c[["item", "title"]] for c in clients]).drop_duplicates("item").sort_values("item")
        index = pd.Index(catalogue["item"].to_numpy())
        shared = {"q": 0.1 * torch.randn(len(index), MF_DIM, generator=gen), "bi": torch.zeros(len(index)),
                  "b": torch.zeros(1)}
        users = [_new_users(c, gen) for c in clients]
        weights = torch.tensor([len(c) for c in clients], dtype=torch.float32)
        weights = weights / weights.sum()
        for _ in range(rounds):
            uploads = []
            for c, own in zip(clients, users):
                m = {**own, **{k: v.clone() for k, v in shared.items()}, "items": index}
                _mf_steps(m, c, ("p", "bu", *ITEM_SIDE), local_steps)
                own["p"], own["bu"] = m["p"], m["bu"]
                uploads.append([m[k] for k in ITEM_SIDE])
            shared = {k: sum(w * up[j] for w, up in zip(weights, uploads)) for j, k in enumerate(ITEM_SIDE)}
        return {**shared, "items": index, "item_of_title": catalogue.drop_duplicates("title").set_index("title")["item"]}


def _history_pairs(evaluate: pd.DataFrame, m: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, trained item index, liked) for every history entry whose item the model knows."""
    rows, titles, liked = [], [], []
    for column, value in (("liked", 1.0), ("disliked", 0.0)):
        lengths = evaluate[column].map(len).to_numpy()
        rows.append(np.repeat(np.arange(len(evaluate)), lengths))
        titles.append(evaluate[column].explode().dropna().to_numpy())
        liked.append(np.full(lengths.sum(), value))
    items = pd.Series(np.concatenate(titles)).map(m["item_of_title"])
    index = m["items"].get_indexer(items.fillna(-1).astype("int64"))
    keep = index >= 0
    return (torch.from_numpy(np.concatenate(rows)[keep]), torch.from_numpy(index[keep]),
            torch.tensor(np.concatenate(liked)[keep], dtype=torch.float32))


def _fold_in(evaluate: pd.DataFrame, m: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row user vector and bias fitted to that row's history with item factors frozen.

    Most valid/test rows under a global time split belong to users absent from train; their
    history (rated strictly before the target) is the only information about them, and it is
    exactly what the LLM sees. A row with no known history items keeps zeros.
    """
    rows, items, y = _history_pairs(evaluate, m)
    pu = torch.zeros(len(evaluate), MF_DIM, requires_grad=True)
    bu = torch.zeros(len(evaluate), requires_grad=True)
    opt = torch.optim.Adam([pu, bu], lr=FOLD_IN_LR)
    for _ in range(FOLD_IN_STEPS):
        opt.zero_grad()
        logit = m["b"] + bu[rows] + m["bi"][items] + (pu[rows] * m["q"][items]).sum(-1)
        loss = F.binary_cross_entropy_with_logits(logit, y, reduction="sum")
        loss = loss + FOLD_IN_L2 * (pu.pow(2).sum() + bu.pow(2).sum())
        (loss / max(len(evaluate), 1)).backward()
        opt.step()
    return pu.detach(), bu.detach()


def _logistic_mf(train: pd.DataFrame, evaluate: pd.DataFrame, seed: int) -> np.ndarray:
    with single_thread():
        return _score_mf(train, evaluate, seed)


def _score_mf(train: pd.DataFrame, evaluate: pd.DataFrame, seed: int) -> np.ndarray:
    return mf_scores(_fit_mf(train, seed), evaluate)


def mf_scores(m: dict, evaluate: pd.DataFrame) -> np.ndarray:
    """p(like) of each row under the fitted MF `m` (unknown users folded in, unknown items at 0)."""
    ie = _index(evaluate["item"], m["items"])
    seen_item, ie = (ie >= 0).float(), ie.clamp(min=0)
    p, b_u = user_factors(m, evaluate)
    logit = m["b"] + b_u + seen_item * (m["bi"][ie] + (p * m["q"][ie]).sum(-1))
    return torch.sigmoid(logit).double().numpy()


def user_factors(m: dict, evaluate: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
    """(user vector [rows, MF_DIM], user bias [rows]) of each row under the fitted MF `m`: users
    seen in training keep their trained factors, the others the fold-in estimate from the row's
    own history (fitted with the item factors frozen)."""
    ue = _index(evaluate["user"], m["users"])
    seen_user = ue >= 0
    if bool(seen_user.all()):  # no fold-in needed (e.g. a client's own train rows)
        return m["p"][ue], m["bu"][ue]
    with torch.enable_grad():  # callers may score under no_grad; the fold-in is a small fit
        pu, bu = _fold_in(evaluate, m)
    if not bool(seen_user.any()):  # none trained (an MF fitted on no user of these rows)
        return pu, bu
    ue = ue.clamp(min=0)
    return torch.where(seen_user[:, None], m["p"][ue], pu), torch.where(seen_user, m["bu"][ue], bu)


def fit_mf(train: pd.DataFrame, seed: int, items: dict | None = None) -> dict:
    """The logistic MF of the baselines fitted on `train` (one thread: see `single_thread`), frozen;
    with `items`, only its users against that shared item side (`fit_mf_federated`). Callers may be
    inside no_grad (a client evaluated before it trains): the fit turns grad on."""
    with single_thread(), torch.enable_grad():
        return _fit_mf(train, seed, items)


def mf_user_vectors(m: dict, rows: pd.DataFrame) -> torch.Tensor:
    """[rows, MF_DIM + 1]: each row's user representation under the frozen MF `m`, its user vector
    and bias (RecLoRA's h_u when model.personal.crm is mf)."""
    with single_thread():
        p, b = user_factors(m, rows)
    return torch.cat([p, b[:, None]], 1).float()


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def baseline_scores(train: pd.DataFrame, evaluate: pd.DataFrame, seed: int = 0) -> dict[str, np.ndarray]:
    popularity, history = like_rate(train, "item", evaluate), _history_share(train, evaluate)
    return {
        "popularity": popularity,
        "history_share": history,
        # The item's and the user's like-rate together, with no fitted weight (naive-Bayes style:
        # the two log-odds add). On MovieLens it beats either alone, so it is the bar to clear.
        "history_popularity": 1.0 / (1.0 + np.exp(-(_logit(history) + _logit(popularity)))),
        "logistic_mf": _logistic_mf(train, evaluate, seed),
    }


def score_metrics(labels, scores: dict[str, np.ndarray], seed: int = 0) -> dict[str, dict[str, float]]:
    """AUC (with its 95 % bootstrap interval), LogLoss and accuracy of each baseline's scores."""
    out = {}
    for name, s in scores.items():
        low, high = auc_ci(labels, s, seed=seed)
        out[name] = {"auc": auc(labels, s), "auc_ci_low": low, "auc_ci_high": high,
                     "logloss": logloss(labels, s), "accuracy": accuracy(labels, s)}
    return out


def write_baseline_scores(path: Path, evaluate: pd.DataFrame, scores: dict[str, np.ndarray]) -> Path:
    """Each evaluated row's key (user, item, timestamp), label and every baseline's score, so a run
    can compare itself with the baselines row by row (a paired difference)."""
    df = evaluate[["user", "item", "timestamp", "label"]].reset_index(drop=True)
    df = df.assign(**{name: np.asarray(s, dtype=np.float64) for name, s in scores.items()})
    df.to_parquet(path, index=False)
    return Path(path)


def evaluate_baselines(train: pd.DataFrame, evaluate: pd.DataFrame, seed: int = 0) -> dict[str, dict[str, float]]:
    return score_metrics(evaluate["label"].to_numpy(), baseline_scores(train, evaluate, seed), seed)
