"""The experiment config's schema: typed sections, parsing, and the checks of each value on its own.

Every section is a dataclass; `_build` walks the YAML against the annotations so that an unknown
key or a value of the wrong type is an error that names the key (`train.lr`), never a silent
default. Whether the enabled components can run *together* is not decided here: each component
declares what it needs and what it breaks (`fedsim.core.capabilities`), and `fedsim.config`
(which loads configs) checks that. Lower layers (models, privacy, the client and server actors)
import this module; only the driver side imports `fedsim.config`.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from fedsim.core.faults import ACTORS, PHASES


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


@dataclass
class SyntheticConfig:
    # Synthetic users.
    num_users: int = 200
    # Synthetic items (movie-like titles).
    num_items: int = 300
    # Ratings each user gives (distinct items; at most num_items).
    ratings_per_user: int = 40
    # Taste clusters the users are drawn from.
    # Clusters make partitions non-IID; the "training works" tests set generosity 3.0.
    num_clusters: int = 4
    # How strongly a rating follows user-item affinity (larger: cleaner signal).
    taste_strength: float = 2.0
    # Clusters' like-tendency spans [-generosity, generosity] (null: [-0.25, 0.75]); large values
    # make labels follow each user's own history (fedsim.data.synthetic).
    generosity: Optional[float] = None


@dataclass
class DataConfig:
    # The ratings: MovieLens-100K (fetched and hash-checked on first use), synthetic users with planted tastes, or your own (interactions).
    dataset: Literal["movielens-100k", "synthetic", "interactions"] = "movielens-100k"
    # dataset interactions (fedsim.data.interactions): the interaction log, CSV or Parquet with user, item, rating or label, timestamp.
    path: Optional[str] = None
    # dataset interactions: the items table, CSV or Parquet with item, title[, year].
    items: Optional[str] = None
    # global: every rating with an earlier one, split by global time (most test users are new).
    # tallrec: TALLRec's protocol (exactly history_len earlier ratings, the keep_last = 10,000 most
    # recent samples, split 8:1:1 in time order), to compare with TALLRec's and APA's tables.
    protocol: Literal["global", "tallrec"] = "global"
    keep_last: Optional[int] = None  # keep only the most recent samples (tallrec: 10,000 when null)
    # How an item is written in the prompt: title_year = "Toy Story (1995)" (TALLRec), title = bare.
    item_text: Literal["title_year", "title"] = "title_year"
    # The prompt template: {liked}, {disliked}, {target}, {target_rate} (the target's like-rate
    # over the train split); null = TALLRec's wording. Or a name: tallrec, tallrec_rate (TALLRec's
    # wording plus the target's like-rate), plain (fedsim.data.prompt). A template must end where
    # the answer starts ("Answer:").
    # An unknown placeholder or a missing {target} is an error.
    prompt: Optional[str] = None
    # Most recent earlier ratings of the user shown in each prompt.
    # Liked and disliked items together.
    history_len: int = 10
    # A rating above this counts as liked (label Yes); at or below, disliked.
    like_threshold: float = 3.0
    # Fractions (train, valid, test) of the samples, split by time.
    # By global time (protocol global).
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    # A fixed random subset of the valid and test splits, drawn before users are split into clients,
    # so runs with different client counts are scored on the same rows. None keeps every row.
    max_eval_rows: Optional[int] = None
    # Per-client caps on rows of each split; None keeps all rows.
    max_train_per_client: Optional[int] = None
    # Per-client cap on valid rows; None keeps all rows.
    max_valid_per_client: Optional[int] = None
    # Per-client cap on test rows; None keeps all rows.
    max_test_per_client: Optional[int] = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class PartitionConfig:
    # How users are split into clients: iid (random), dirichlet (per taste group, Dirichlet(alpha) shares per client), kmeans (one taste cluster per client).
    # kmeans is PPLR's: k-means over unit-length user embeddings.
    method: Literal["iid", "dirichlet", "kmeans"] = "iid"
    # Dirichlet concentration for method dirichlet: small values give skewed, non-IID clients.
    alpha: float = 0.5


@dataclass
class LoraConfig:
    # LoRA rank.
    r: int = 8
    # LoRA scaling numerator (the update is scaled by alpha / r).
    alpha: int = 16
    # Dropout on the LoRA input.
    dropout: float = 0.05
    # Module names that get LoRA adapters.
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # Adapt only the last k decoder layers (null: every layer); cheaper steps, see fedsim.models.lora.
    # Backward then stops at the first adapted layer: a step costs a forward plus k/L of a backward.
    top_layers: Optional[int] = None


@dataclass
class PersonalConfig:
    """RecLoRA personalisation (fedsim.models.bank, fedsim.client.trainers.personal): a bank of
    `bank` meta-LoRAs per target module, mixed per user by a router alpha = softmax(MLP(h_u) / T),
    h_u the user's vector from a frozen conventional recommender fitted on the client's own train
    rows before the LLM stage. The bank is uploaded and averaged; the router stays on the client
    unless share_router."""
    # Meta-LoRAs per target module (N_m); 0 = off (one plain LoRA).
    bank: int = 0
    # Router temperature T: alpha = softmax(MLP(h_u) / T); small T sharpens the mix.
    temperature: float = 1.0
    # Hidden units of the router MLP (0: a linear router).
    router_hidden: int = 32
    # weights: A_u = sum a_k A_k, B_u = sum a_k B_k, dy = B_u A_u x (RecLoRA's code); outputs: dy = sum a_k B_k A_k x.
    merge: Literal["weights", "outputs"] = "weights"
    # The user representation h_u: mf = logistic matrix factorisation (fedsim.baselines) on the
    # client's own train rows, [user factor, user bias]; users it never saw are folded in from the row's history.
    # sequential = a DIN-style attention over the user's long ID history (fedsim.models.sequential_crm), the
    # history pooled by attention to the row's target item; fitted on the client's own train rows too.
    crm: Literal["mf", "sequential"] = "mf"
    # crm sequential: the long ID history's length, (item, liked) pairs rated strictly before the row, from the
    # client's earlier train rows of the user and the row's own text history.
    crm_history: int = 60
    # false: each client's router is private (kept in its store entry); true: uploaded and averaged with the bank.
    share_router: bool = False
    # crm mf: local = each client fits its own MF on its own rows (nothing leaves the client; the default);
    # federated = FedAvg over the MF's item side (item factors and biases), user factors local, for crm_rounds
    # rounds before the LLM stage (fedsim.baselines.fit_mf_federated); each client then fits its users against it.
    crm_training: Literal["local", "federated"] = "local"
    # crm_training federated: FedAvg rounds of the MF (5 local full-batch steps each).
    crm_rounds: int = 20


@dataclass
class ModelConfig:
    # `smollm2-135m` (embedded real default), `tiny-random`, or any HF causal LM name / local path.
    # `smollm2-135m-shape`: random weights of SmolLM2-135M's size and a word tokenizer (GPU benchmarks); `tiny-random` is a 2-layer Llama with a word tokenizer (tests).
    name: str = "smollm2-135m"
    # Weights' dtype; auto: bfloat16 on a GPU, float32 on a CPU.
    # LoRA weights stay float32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Prompt tokens kept (longer prompts are truncated from the left).
    # The history is cut, never the target.
    max_length: int = 256
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Decoder layers of the `tiny-random` model (storage.mode split needs at least 3).
    tiny_layers: int = 2
    personal: PersonalConfig = field(default_factory=PersonalConfig)


@dataclass
class ClientsConfig:
    # Number of clients (users are split among them).
    num: int = 4
    # Clients sampled per round: an int count, or a fraction of `num` when <= 1.0 and a float.
    per_round: Union[int, float] = 1.0
    # fixed: exactly per_round clients, drawn without replacement. poisson: each client joins a
    # round on its own with probability q = per_round / num (so per_round is the expected count
    # and a round may have none), the sampling client-level DP accounting assumes.
    sampling: Literal["fixed", "poisson"] = "fixed"


@dataclass
class ExecutorsConfig:
    # 0 = one actor per client; k > 0 = a pool of k actors serving the clients as virtual clients.
    num: int = 0
    # CPUs Ray reserves for each executor actor.
    # Torch threads = its integer part.
    num_cpus: float = 1.0
    # "auto": 1/(actors per GPU) when the cluster has GPUs, else 0.
    num_gpus: Union[float, Literal["auto"]] = "auto"
    # Times Ray restarts a crashed executor actor.
    max_restarts: int = 3
    # Where the executors go on a cluster of several nodes: "pack" (as few nodes as possible) or
    # "spread" (across the nodes): the strategy, PACK or SPREAD, of the placement group that
    # reserves one bundle per executor (in a `fedsim tune` trial, the trial's placement group).
    placement: Literal["pack", "spread"] = "pack"
    # Train the clients an executor serves in a round together (fedsim.models.fused): one
    # forward/backward over all their batches, each row through its own client's LoRA.
    # Exactly what one-by-one training gives; not with privacy.sample_dp.
    fused: bool = False
    # Most rows in one fused forward/backward; a step with more runs as several passes over whole
    # clients, gradients accumulated (bounds activation memory). None: all of a step's rows at once.
    fused_rows: Optional[int] = None
    # torch.compile each executor's decoder (dynamic shapes): pays a compile per executor (minutes
    # on a CPU) for faster steps on a GPU.
    # Not with privacy.sample_dp.
    compile: bool = False


@dataclass
class TrainConfig:
    # Federated rounds.
    rounds: int = 3
    # Local work per client per round: `local_steps` optimizer steps, or `local_epochs` over the
    # client's train rows when local_steps is None.
    local_steps: Optional[int] = 8
    # Epochs over the client's train rows per round (when local_steps is None).
    local_epochs: Optional[float] = None
    # Rows per local optimizer step.
    # Each client's AdamW state persists across rounds.
    batch_size: int = 4
    # Local learning rate (AdamW).
    lr: float = 1e-3
    # The lr over the run's local steps (fedsim.client.schedule): linear warm-up over the first
    # `warmup` fraction, then constant, linear or cosine decay to 0 (warm-up + decay = one-cycle).
    # Client k's step s in round r is global step r * steps + s, so the schedule is the same fused or unfused, on any actor, and after a resume.
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    # Fraction of the run's local steps spent warming the lr up (in [0, 1)).
    warmup: float = 0.0
    # AdamW weight decay on the LoRA parameters.
    weight_decay: float = 0.0
    # Seed of every random choice (data, partition, sampling, init, noise, bootstrap).
    seed: int = 0


@dataclass
class PPLRConfig:
    # PPLR dynamic balance: w_i = tanh(alpha / p_i^(round + 1/beta)), p = softmax(train losses / temperature).
    alpha: float = 0.7
    # PPLR's beta in the exponent round + 1/beta.
    beta: float = 1.0
    # Softmax temperature over the clients' train losses.
    temperature: float = 0.05
    # Next-round learning rate from each client's standing: `loss_gap` scales base lr by
    # clip(1 + lr_gamma * z-score of the client's last train loss, lr_min_scale, lr_max_scale).
    # Lagging clients learn faster; `none` keeps the base lr.
    lr_rule: Literal["none", "loss_gap"] = "loss_gap"
    # loss_gap: how much the z-score of a client's loss moves its lr.
    lr_gamma: float = 0.5
    # loss_gap: the lowest lr multiplier.
    lr_min_scale: float = 0.5
    # loss_gap: the highest lr multiplier.
    lr_max_scale: float = 2.0
    # What s_ij compares: `adapter` (theta_i, as in the paper) or `update` (theta_i - theta_0, what
    # the client has learned since the shared init; with a shared init the adapters' cosine is
    # dominated by the common A and is ~1 for every pair, so `update` is what tells clients apart)
    # or `round` (delta_i, this round's local update alone: `update` converges to ~1 too once every
    # client starts its rounds from a mix near the mean).
    similarity_on: Literal["adapter", "update", "round"] = "adapter"
    # Where the aggregator keeps each client's adapter (fedsim.server.table): `memory`, or `disk`
    # (one file per client in the run directory; the aggregator holds only the sampled clients);
    # `auto`: disk once the table would pass 1 GiB (about 580 SmolLM2 LoRA adapters).
    table: Literal["auto", "memory", "disk"] = "auto"


@dataclass
class StrategyConfig:
    # Aggregation rule: fedavg (weighted by train rows) or pplr (dynamic balance, with strategy.pplr).
    name: Literal["fedavg", "pplr"] = "fedavg"
    pplr: PPLRConfig = field(default_factory=PPLRConfig)
    # How LoRA factors are shared (fedsim.models.lora): `separate` averages A and B apart (inexact:
    # mean(B A) != mean(B) mean(A)); `ffa` freezes A at the shared init, only B is trained and sent
    # (exact); `fedsa` sends only A, each client keeps its own B (personalised); `stack` (FLoRA)
    # stacks the clients' fresh factors, sum_k p_k B_k A_k exactly, and merges it into the base.
    # ffa sends about half the traffic; stack downloads the dense update and merges it into the base each round.
    lora_mode: Literal["separate", "ffa", "fedsa", "stack"] = "separate"


@dataclass
class EvalConfig:
    # The split the federated model and baselines are scored on.
    # Every client is evaluated on its own rows of this split; the pooled AUC is over all of them.
    split: Literal["test", "valid"] = "test"
    # Evaluate every this many rounds (the last round always).
    every: int = 1
    # Rows per scoring forward pass.
    batch_size: int = 16
    # Clients evaluated: None = every client; an int count or a float fraction (<= 1) of clients.num,
    # a fixed random subset drawn once from train.seed, so every evaluation scores the same clients.
    clients: Optional[Union[int, float]] = None
    # Rows each evaluated client scores at the evaluations before the last round (a fixed seeded
    # subset, the same every time); the last evaluation scores every row. None: every row always.
    # Scoring is most of a CPU run's evaluation cost; a subset still shows the learning curve.
    # Interim AUCs carry wider intervals.
    interim_rows: Optional[int] = None
    # The per-client summaries (auc_mean, auc_std, auc_min, auc_max, auc_gap, auc_q25, auc_q75)
    # count only clients with at least this many scored rows. With users as clients many hold 1-3
    # test rows, whose AUC is 0, 0.5 or 1 by chance, and the worst-to-best band is then always 0 to
    # 1. Every row still counts in the pooled AUC, and every client's own client/C/auc is still logged.
    client_min_rows: int = 1


@dataclass
class FaultsConfig:
    # The round fails when fewer than this fraction of the sampled clients report.
    quorum: float = 0.5
    # Chaos testing: kill an actor's process once per run, to rehearse dropout, actor restarts and
    # resume. {round: r, client: c}: the executor serving `client` dies as it starts that client's
    # local training in round r; add `phase: eval` for its evaluation of round r instead.
    # {round: r, actor: aggregator}: the aggregator dies as it starts aggregating round r;
    # actor: split_server (storage.mode split) at round r's first training forward; actor:
    # key_holder (privacy.he) as it is asked to decrypt round r's sum.
    crash: list[dict[str, Union[int, str]]] = field(default_factory=list)
    # Stragglers: a sampled client not back within this many seconds of the round's start is dropped
    # from that round; its late update is discarded, as is what it saved, so no later round uses it.
    # None: wait for every client.
    round_timeout: Optional[float] = None
    # Chaos testing with faults.round_timeout: `client` is a straggler in round `round`, starting its
    # local training only once the driver has given up on it. Entries: {round: r, client: c}.
    slow: list[dict[str, int]] = field(default_factory=list)


@dataclass
class TrackingConfig:
    # Log the run to MLflow.
    enabled: bool = True
    # MLflow tracking URI; null: --tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db.
    uri: Optional[str] = None
    # MLflow experiment name (created when missing).
    experiment: str = "fedsim"


@dataclass
class ClientDPConfig:
    """Client-level DP-FedAvg (McMahan et al. 2018): clip each client's update, average uniformly,
    add Gaussian noise on the server. Set exactly one of `epsilon` (a target for the whole run, the
    noise is calibrated to it) and `noise_multiplier`."""
    # Turn client-level DP on.
    enabled: bool = False
    # Target epsilon for the whole run (noise calibrated to it).
    epsilon: Optional[float] = None
    # Noise std / clip, instead of an epsilon target.
    noise_multiplier: Optional[float] = None
    # DP delta; must be < 1/clients.num.
    delta: float = 1e-5
    # L2 bound on each client's update.
    # The m sampled clients' clipped updates are averaged uniformly; the server adds N(0, (z*C/m)^2).
    clip: float = 1.0
    # Opacus accountant: rdp or prv.
    # One accountant step per round at q = m/N.
    accountant: Literal["rdp", "prv"] = "rdp"


@dataclass
class DPLoraConfig:
    """Local Gaussian mechanism on the LoRA A and B parts of each client's update, clipped apart."""
    # Turn DP-LoRA on.
    enabled: bool = False
    # L2 bound on each of the A and B parts of an update.
    # The parts are clipped and noised before upload.
    clip: float = 1.0
    # Noise std / clip.
    noise_multiplier: float = 1.0
    # DP delta of the reported epsilon.
    delta: float = 1e-5


@dataclass
class SampleDPConfig:
    """Record-level DP-SGD on each client (Opacus): Poisson-sampled batches, per-sample clipping,
    Gaussian noise. Set exactly one of `epsilon` (a per-client target over the whole run) and
    `noise_multiplier`."""
    # Turn record-level DP-SGD on.
    enabled: bool = False
    # Per-client target epsilon over the whole run.
    epsilon: Optional[float] = None
    # Noise std / max_grad_norm, instead of an epsilon target.
    noise_multiplier: Optional[float] = None
    # DP delta.
    delta: float = 1e-5
    # Per-sample gradient clip.
    max_grad_norm: float = 1.0
    # Opacus accountant: rdp or prv.
    # One accountant per client.
    accountant: Literal["rdp", "prv"] = "rdp"


@dataclass
class SecAggConfig:
    """Secure aggregation (pairwise additive masks, Bonawitz et al. 2017; fedsim.privacy.secagg):
    the aggregator holds only masked vectors and their sum. Updates are encoded in fixed point with
    `scale_bits` fractional bits in the ring of integers mod 2^`bits` (32: int32 on the wire, else
    int64); a weighted entry may be up to about 2^(bits - 1 - scale_bits) / (clients per round)."""
    # Turn secure aggregation on.
    # Masks from X25519 + HKDF; dropped clients' masks are recovered from the survivors.
    enabled: bool = False
    # Ring size in bits (16 to 64).
    bits: int = 48
    # Fractional bits of the fixed-point encoding.
    scale_bits: int = 24


@dataclass
class HEConfig:
    """Homomorphic aggregation with TenSEAL CKKS (fedsim.privacy.he; the optional extra fedsim[he]):
    an alternative to privacy.secagg where the aggregator adds encrypted updates with a public
    context and a key-holder actor decrypts only their sum. CKKS is approximate: an entry of the sum
    is off by about 2^-scale_bits times the clients per round; uploads are about 14 times bigger
    than float32 at the default sizes. `poly_modulus_degree` / 2 entries go in one ciphertext."""
    # Turn CKKS homomorphic aggregation on (needs fedsim[he]).
    enabled: bool = False
    # CKKS ring degree: 8192, 16384 or 32768.
    poly_modulus_degree: int = 8192
    # CKKS scale in bits (20 to 50).
    scale_bits: int = 40


@dataclass
class AuditConfig:
    """Loss-threshold membership-inference attack on the final model: rows a client trained on
    against held-out rows of the same users; 0.5 = nothing to tell them apart."""
    # Run the membership-inference audit after the last round.
    # Logged as privacy/mia_auc (0.5 = no leakage).
    enabled: bool = False
    # Member and non-member rows scored per client.
    rows_per_client: int = 64
    # Fraction of each client's train rows never trained on and kept as the attack's non-members
    # (same users, same time span). 0 takes the non-members from train rows a client happened not
    # to reach, or from its valid/test rows when it trained on all of them.
    holdout: float = 0.0


@dataclass
class PrivacyConfig:
    client_dp: ClientDPConfig = field(default_factory=ClientDPConfig)
    dp_lora: DPLoraConfig = field(default_factory=DPLoraConfig)
    sample_dp: SampleDPConfig = field(default_factory=SampleDPConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    he: HEConfig = field(default_factory=HEConfig)


@dataclass
class StorageConfig:
    """PPLR flexible storage (fedsim.models.split). `split`: the client keeps the embeddings, decoder
    layers [0, client_layers), the last decoder layer, the final norm and the LM head, with their
    LoRA private; a server actor holds layers [client_layers, L-1), whose LoRA is aggregated.
    1 <= client_layers <= L-2 is checked against the model before any actor starts."""
    # full: each client runs the whole model; split: PPLR flexible storage (see above).
    mode: Literal["full", "split"] = "full"
    # Leading decoder layers kept on the client (split).
    # The client keeps decoder layers [0, k) and the last one; the server layers [k, L-1); 1 <= k <= L-2.
    client_layers: int = 1
    # CPUs of the actor holding the middle layers (split).
    # The split server actor's resources (see server_num_gpus).
    server_num_cpus: float = 1.0
    # "auto": the same GPU fraction as one executor (0 on a cluster without GPUs).
    server_num_gpus: Union[float, Literal["auto"]] = "auto"
    # Put the split server on a node that has this Ray resource: a custom one its node was started
    # with (`ray start --resources '{"split_host": 1}'`), or "node:__internal_head__" for the head.
    # The server asks for 0.001 of it. None: wherever Ray has room.
    server_node_resource: Optional[str] = None


@dataclass
class UnlearningConfig:
    """APA-style exact unlearning (fedsim.unlearning): the train rows split into `shards` disjoint
    shards, one adapter per shard trained only on its rows (its own federation over the clients
    holding them), a deletion retrains only the shards that held the deleted rows. 0 = off; 1 =
    one shard holding every row (plain retraining, the comparison point of a sweep over K).
    partition: `random` (each row by a seeded hash of its key), `user` (each user's rows by a
    seeded hash of the user: all of a user's rows in one shard), `semantic` (APA's balanced
    partition: k-means on the frozen base model's mean-pooled last hidden state of the prompts,
    then greedy nearest-centre assignment under the cap `shard_size`, null = ceil(N / shards)).
    Inference merges the shard adapters per test row: the `neighbours` most similar validation
    rows (cosine on the same hidden states), each adapter's mean log loss on them, weights
    softmax(-tau * loss); `merge` weights = (sum w B)(sum w A), outputs = sum w B A x."""
    # Number of shard adapters K: 0 = off, 1 = plain retraining (one adapter on every row).
    shards: int = 0
    # How train rows go to shards: random (by row key), user (all of a user's rows together), semantic (APA's balanced k-means).
    partition: Literal["random", "user", "semantic"] = "user"
    # Semantic partition's size cap per shard; null = ceil(N / shards).
    shard_size: Optional[int] = None
    # Inference merge: weights = (sum w B)(sum w A), APA(D); outputs = sum w B A x, APA(ND).
    merge: Literal["weights", "outputs"] = "weights"
    # Merge temperature: a shard's weight is softmax(-tau * its mean loss on the row's neighbours).
    tau: float = 10.0
    # Nearest validation rows (cosine on the base model's hidden states) that weigh the shards per test row.
    neighbours: int = 20


@dataclass
class Config:
    # The run's name: the MLflow run name and the prefix of its directory runs/<name>-<timestamp>.
    name: str = "run"
    # Where run directories are created.
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    executors: ExecutorsConfig = field(default_factory=ExecutorsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    unlearning: UnlearningConfig = field(default_factory=UnlearningConfig)


# ---------------------------------------------------------------------------------------------
# Parsing against the annotations


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {k: _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in hints:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {', '.join(names)}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} {why}")


def count_of(k: int | float, n: int) -> int:
    """An int count as it is, or a fraction of `n` rounded half up, at least 1 (clients.per_round,
    eval.clients)."""
    return k if isinstance(k, int) else max(1, math.floor(k * n + 0.5))


def clients_per_round(cfg: Config) -> int:
    """m: the clients sampled per round; with clients.sampling poisson, the expected number (q = m / N)."""
    return count_of(cfg.clients.per_round, cfg.clients.num)


def validate(cfg: Config) -> Config:
    """Range checks that the types alone cannot express."""
    d, t = cfg.data, cfg.train
    _check(d.history_len >= 1, "data.history_len", d.history_len, "must be >= 1")
    if d.dataset == "interactions":
        for key in ("path", "items"):
            value = getattr(d, key)
            _check(value is not None, f"data.{key}", value, "is needed by data.dataset 'interactions' (a CSV or Parquet file)")
            _check(Path(value).expanduser().is_file(), f"data.{key}", value, "does not exist")
    _check(d.keep_last is None or d.keep_last >= 10, "data.keep_last", d.keep_last, "must be >= 10 or null")
    if d.prompt is not None:
        from fedsim.data.prompt import check_template

        try:
            check_template(d.prompt)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _check(len(d.split) == 3 and all(x > 0 for x in d.split) and abs(sum(d.split) - 1) < 1e-6,
           "data.split", d.split, "must be three positive fractions (train, valid, test) summing to 1")
    for k in ("max_eval_rows", "max_train_per_client", "max_valid_per_client", "max_test_per_client"):
        v = getattr(d, k)
        _check(v is None or v >= 1, f"data.{k}", v, "must be >= 1 or null")
    s = d.synthetic
    for k in ("num_users", "num_items", "ratings_per_user", "num_clusters"):
        _check(getattr(s, k) >= 1, f"data.synthetic.{k}", getattr(s, k), "must be >= 1")
    _check(cfg.partition.alpha > 0, "partition.alpha", cfg.partition.alpha, "must be > 0")
    m = cfg.model
    # A local path is checked here, before a run directory exists; a hub name only when it is loaded.
    _check(not m.name.startswith((".", "/", "~")) or Path(m.name).expanduser().exists(), "model.name", m.name,
           "is a local path that does not exist")
    _check(m.max_length >= 16, "model.max_length", m.max_length, "must be >= 16")
    _check(m.lora.r >= 1, "model.lora.r", m.lora.r, "must be >= 1")
    _check(0 <= m.lora.dropout < 1, "model.lora.dropout", m.lora.dropout, "must be in [0, 1)")
    _check(m.lora.top_layers is None or m.lora.top_layers >= 1, "model.lora.top_layers", m.lora.top_layers,
           "must be >= 1 or null (every layer)")
    _check(len(m.lora.target_modules) > 0, "model.lora.target_modules", m.lora.target_modules, "must name at least one module")
    c = cfg.clients
    _check(c.num >= 1, "clients.num", c.num, "must be >= 1")
    if isinstance(c.per_round, float):
        _check(0 < c.per_round <= 1, "clients.per_round", c.per_round, "as a fraction must be in (0, 1]")
    else:
        _check(1 <= c.per_round <= c.num, "clients.per_round", c.per_round, f"as a count must be in [1, clients.num={c.num}]")
    e = cfg.executors
    _check(e.num >= 0, "executors.num", e.num, "must be >= 0 (0 = one actor per client)")
    _check(e.num_cpus > 0, "executors.num_cpus", e.num_cpus, "must be > 0")
    _check(e.num_gpus == "auto" or 0 <= e.num_gpus <= 1, "executors.num_gpus", e.num_gpus, "must be 'auto' or in [0, 1]")
    _check(e.max_restarts >= 0, "executors.max_restarts", e.max_restarts, "must be >= 0")
    _check(e.fused_rows is None or e.fused_rows >= 1, "executors.fused_rows", e.fused_rows, "must be >= 1 or null")
    _check(t.rounds >= 1, "train.rounds", t.rounds, "must be >= 1")
    _check((t.local_steps is None) != (t.local_epochs is None), "train.local_steps", t.local_steps,
           "set exactly one of train.local_steps and train.local_epochs")
    _check(t.local_steps is None or t.local_steps >= 1, "train.local_steps", t.local_steps, "must be >= 1")
    _check(t.local_epochs is None or t.local_epochs > 0, "train.local_epochs", t.local_epochs, "must be > 0")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _check(t.lr > 0, "train.lr", t.lr, "must be > 0")
    _check(0 <= t.warmup < 1, "train.warmup", t.warmup, "must be in [0, 1) (a fraction of the run's local steps)")
    _check(cfg.eval.every >= 1, "eval.every", cfg.eval.every, "must be >= 1")
    ec = cfg.eval.clients
    if isinstance(ec, float):
        _check(0 < ec <= 1, "eval.clients", ec, "as a fraction must be in (0, 1]")
    elif ec is not None:
        _check(1 <= ec <= c.num, "eval.clients", ec, f"as a count must be in [1, clients.num={c.num}] (null = every client)")
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, "must be >= 1")
    _check(cfg.eval.interim_rows is None or cfg.eval.interim_rows >= 2, "eval.interim_rows", cfg.eval.interim_rows,
           "must be >= 2 or null (every row)")
    _check(cfg.eval.client_min_rows >= 1, "eval.client_min_rows", cfg.eval.client_min_rows, "must be >= 1")
    pp = cfg.strategy.pplr
    for k in ("alpha", "beta", "temperature"):
        _check(getattr(pp, k) > 0, f"strategy.pplr.{k}", getattr(pp, k), "must be > 0")
    _check(0 < pp.lr_min_scale <= 1, "strategy.pplr.lr_min_scale", pp.lr_min_scale, "must be in (0, 1]")
    _check(pp.lr_max_scale >= 1, "strategy.pplr.lr_max_scale", pp.lr_max_scale, "must be >= 1")
    _check(0 < cfg.faults.quorum <= 1, "faults.quorum", cfg.faults.quorum, "must be in (0, 1]")
    for i, crash in enumerate(cfg.faults.crash):
        _validate_crash(crash, f"faults.crash[{i}]", c.num, cfg)
    f = cfg.faults
    _check(f.round_timeout is None or f.round_timeout > 0, "faults.round_timeout", f.round_timeout,
           "must be > 0 seconds or null (wait for every client)")
    for i, slow in enumerate(f.slow):
        _check(set(slow) == {"round", "client"}, f"faults.slow[{i}]", slow, "needs exactly the keys round and client")
        _check(0 <= slow["client"] < c.num, f"faults.slow[{i}].client", slow["client"], f"must be in [0, {c.num})")
        _check(f.round_timeout is not None, f"faults.slow[{i}]", slow,
               "needs faults.round_timeout (a straggler waits for the driver to give up on it)")
    _validate_privacy(cfg)
    _validate_storage(cfg)
    _validate_unlearning(cfg)
    _validate_personal(cfg)
    return cfg


def _validate_crash(crash: dict, key: str, clients: int, cfg: Config) -> None:
    _check(set(crash) in ({"round", "client"}, {"round", "client", "phase"}, {"round", "actor"}), key, crash,
           "needs the keys round and client (and optionally phase), or round and actor")
    _check(isinstance(crash["round"], int) and crash["round"] >= 0, f"{key}.round", crash["round"], "must be an integer >= 0")
    if "actor" in crash:
        _check(crash["actor"] in ACTORS, f"{key}.actor", crash["actor"], f"must be one of {', '.join(ACTORS)}")
        _check(crash["actor"] != "split_server" or cfg.storage.mode == "split", f"{key}.actor", crash["actor"],
               "needs storage.mode: split (the run has no split server otherwise)")
        _check(crash["actor"] != "key_holder" or cfg.privacy.he.enabled, f"{key}.actor", crash["actor"],
               "needs privacy.he.enabled: true (the run has no CKKS key holder otherwise)")
        return
    _check(isinstance(crash["client"], int) and 0 <= crash["client"] < clients, f"{key}.client", crash["client"],
           f"must be in [0, {clients})")
    _check(crash.get("phase", "train") in PHASES, f"{key}.phase", crash.get("phase"), f"must be one of {', '.join(PHASES)}")


def _validate_personal(cfg: Config) -> None:
    """The bank's own values; what it cannot run with is declared by the component
    (fedsim.client.trainers.personal) and checked by fedsim.config."""
    p = cfg.model.personal
    _check(p.bank >= 0, "model.personal.bank", p.bank, "must be >= 0 (0 = off)")
    if not p.bank:
        return
    _check(p.temperature > 0, "model.personal.temperature", p.temperature, "must be > 0")
    _check(p.router_hidden >= 0, "model.personal.router_hidden", p.router_hidden, "must be >= 0 (0 = a linear router)")
    _check(p.crm_history >= 1, "model.personal.crm_history", p.crm_history, "must be >= 1")
    _check(p.crm_rounds >= 1, "model.personal.crm_rounds", p.crm_rounds, "must be >= 1")
    _check(p.crm_training == "local" or p.crm == "mf", "model.personal.crm_training", p.crm_training,
           f"needs model.personal.crm mf (a federated {p.crm!r} CRM is not built)")


def _validate_unlearning(cfg: Config) -> None:
    """Shard adapters: their own values, and the modes whose result is not one peft adapter per
    shard (what the merge stacks)."""
    u = cfg.unlearning
    _check(u.shards >= 0, "unlearning.shards", u.shards, "must be >= 0 (0 = off)")
    if not u.shards:
        return
    _check(u.shard_size is None or u.shard_size >= 1, "unlearning.shard_size", u.shard_size, "must be >= 1 or null")
    _check(u.shard_size is None or u.partition == "semantic", "unlearning.shard_size", u.shard_size,
           "caps the semantic partition only; set unlearning.partition=semantic or leave it null")
    _check(u.tau >= 0, "unlearning.tau", u.tau, "must be >= 0 (0 = uniform weights)")
    _check(u.neighbours >= 1, "unlearning.neighbours", u.neighbours, "must be >= 1")
    _check(cfg.eval.split == "test", "eval.split", cfg.eval.split,
           "is where the merge finds each row's neighbours: unlearning.shards needs eval.split test")
    _check(cfg.strategy.lora_mode != "stack", "strategy.lora_mode", "stack",
           "exports a dense update, not a LoRA adapter: unlearning.shards needs separate, ffa or fedsa")
    _check(cfg.storage.mode == "full", "storage.mode", cfg.storage.mode,
           "keeps LoRA on the split server: unlearning.shards needs storage.mode full")
    _check(cfg.strategy.name == "fedavg", "strategy.name", cfg.strategy.name,
           "keeps per-client adapters: unlearning.shards needs fedavg (one adapter per shard)")
    _check(cfg.model.personal.bank == 0, "model.personal.bank", cfg.model.personal.bank,
           "replaces the peft adapter the shard merge stacks: unlearning.shards needs model.personal.bank 0")


def _validate_storage(cfg: Config) -> None:
    """Split execution's own settings; the range of
    `client_layers` against the model's depth is checked when the model is known
    (fedsim.models.split.check_split, called by fedsim.prepare)."""
    st = cfg.storage
    _check(cfg.model.tiny_layers >= 1, "model.tiny_layers", cfg.model.tiny_layers, "must be >= 1")
    if st.mode != "split":
        return
    _check(st.client_layers >= 1, "storage.client_layers", st.client_layers,
           "must be >= 1 (the client keeps decoder layers [0, client_layers) and the last one)")
    _check(st.server_num_cpus > 0, "storage.server_num_cpus", st.server_num_cpus, "must be > 0")
    _check(st.server_num_gpus == "auto" or 0 <= st.server_num_gpus <= 1, "storage.server_num_gpus",
           st.server_num_gpus, "must be 'auto' or in [0, 1]")


def _validate_privacy(cfg: Config) -> None:
    """Checks of the enabled privacy mechanisms (a disabled one's settings are not looked at).
    Whether an epsilon target can be reached at all is known only when the noise is calibrated,
    which raises a ValueError naming the key before the first round."""
    n = cfg.clients.num
    for name in ("client_dp", "sample_dp"):
        p = getattr(cfg.privacy, name)
        if not p.enabled:
            continue
        key = f"privacy.{name}"
        _check((p.epsilon is None) != (p.noise_multiplier is None), f"{key}.epsilon", p.epsilon,
               f"set exactly one of {key}.epsilon (a target) and {key}.noise_multiplier "
               f"(got noise_multiplier={p.noise_multiplier!r})")
        _check(p.epsilon is None or p.epsilon > 0, f"{key}.epsilon", p.epsilon, "must be > 0")
        _check(p.noise_multiplier is None or p.noise_multiplier > 0, f"{key}.noise_multiplier",
               p.noise_multiplier, "must be > 0")
        _check(0 < p.delta < 1, f"{key}.delta", p.delta, "must be in (0, 1)")
    cd = cfg.privacy.client_dp
    if cd.enabled:
        # Client-level DP protects one client among N: a delta of 1/N or more allows releasing one
        # client's update outright.
        _check(cd.delta < 1 / n, "privacy.client_dp.delta", cd.delta, f"must be < 1/clients.num = {1 / n:.4g}")
        _check(cd.clip > 0, "privacy.client_dp.clip", cd.clip, "must be > 0")
    dl = cfg.privacy.dp_lora
    if dl.enabled:
        _check(dl.clip > 0, "privacy.dp_lora.clip", dl.clip, "must be > 0")
        _check(dl.noise_multiplier > 0, "privacy.dp_lora.noise_multiplier", dl.noise_multiplier, "must be > 0")
        _check(0 < dl.delta < 1, "privacy.dp_lora.delta", dl.delta, "must be in (0, 1)")
    _check(cfg.privacy.audit.rows_per_client >= 1, "privacy.audit.rows_per_client",
           cfg.privacy.audit.rows_per_client, "must be >= 1")
    _check(0 <= cfg.privacy.audit.holdout < 1, "privacy.audit.holdout", cfg.privacy.audit.holdout, "must be in [0, 1)")
    sd = cfg.privacy.sample_dp
    if sd.enabled:
        _check(sd.max_grad_norm > 0, "privacy.sample_dp.max_grad_norm", sd.max_grad_norm, "must be > 0")
    he = cfg.privacy.he
    if he.enabled:
        _check(he.poly_modulus_degree in (8192, 16384, 32768), "privacy.he.poly_modulus_degree",
               he.poly_modulus_degree, "must be 8192, 16384 or 32768")
        _check(20 <= he.scale_bits <= 50, "privacy.he.scale_bits", he.scale_bits, "must be in [20, 50]")
        _check(importlib.util.find_spec("tenseal") is not None, "privacy.he.enabled", he.enabled,
               "needs TenSEAL, which is not installed: pip install 'fedsim[he]'")
    sa = cfg.privacy.secagg
    if sa.enabled:
        _check(16 <= sa.bits <= 64, "privacy.secagg.bits", sa.bits, "must be in [16, 64]")
        _check(0 <= sa.scale_bits <= sa.bits - 2, "privacy.secagg.scale_bits", sa.scale_bits,
               f"must be in [0, privacy.secagg.bits - 2 = {sa.bits - 2}]")
        m = clients_per_round(cfg)
        limit = (2 ** (sa.bits - 1) - 1) // m / 2 ** sa.scale_bits
        # Each client's weight is one of the encoded entries; FedAvg weights are sample counts >= 1.
        _check(limit >= 1, "privacy.secagg.scale_bits", sa.scale_bits,
               f"leaves entries of at most {limit:.3g} representable with {m} clients per round "
               f"(privacy.secagg.bits={sa.bits}); lower it or raise privacy.secagg.bits")


# ---------------------------------------------------------------------------------------------
# Loading, overrides, flattening


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (['train', 'lr'], 0.001); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.rounds=5")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML reads 1e-3 as a string; numbers written that way are meant as floats.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def set_key(data: dict, path: list[str], value: Any, where: str) -> None:
    """data['a']['b'] = value for path ['a', 'b'], creating sections; `where` prefixes errors."""
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: '{part}' is not a section")
    node[path[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides or []:
        path, value = parse_override(text)
        set_key(data, path, value, f"--set {text!r}")
    return data


def config_from_dict(data: dict) -> Config:
    return validate(_build(Config, data or {}))


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file holding a mapping (an empty file reads as {}); errors name it as `what`
    ("config file", "sweep file") and its path."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    if p.is_dir():
        raise ConfigError(f"{what} {str(p)!r} is a directory, not a YAML file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        # PyYAML's message spans several lines (the offending text drawn with a caret): keep the place and the problem.
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {str(p)!r} is not a text file") from None
    if data is None:
        # An empty file would silently run every default (the real model, MovieLens): say so instead.
        raise ConfigError(f"{what} {str(p)!r} is empty; start from one in configs/ (e.g. configs/tiny.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(p)!r} must hold a mapping (key: value lines) at the top level, "
                          f"not a {type(data).__name__}")
    return data


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
