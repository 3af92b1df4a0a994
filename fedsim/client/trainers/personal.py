"""`model.personal.bank: N_m` (RecLoRA): a bank of N_m meta-LoRAs per target module, mixed per user
(`fedsim.models.bank`). Each row's mix alpha = softmax(MLP(h_u) / T) comes from its user's vector
h_u under a conventional recommender (CRM) that is frozen while the LLM part trains:

- the CRM (`model.personal.crm: mf`) is the logistic MF of `fedsim.baselines`, fitted on the
  client's own train rows the first time the client is seen ("Few2Many": ID data first), and never
  trained again; `crm: sequential` is the DIN-style attention over the user's long ID history of
  `fedsim.models.sequential_crm`, fitted and frozen the same way. It is the client's own: no ID
  data leaves the client, and no other client's rows shape it. A seeded fit of the same rows gives
  the same model, so any executor serving the client rebuilds it instead of storing it. A user the
  MF never saw (a new user of the valid / test split) is folded in from the row's own history with
  the item factors frozen; the sequential CRM reads that history directly.
- the bank's A and B blocks take the roles of `strategy.lora_mode` (separate: both shared; ffa:
  A frozen; fedsa: B local): what is shared is uploaded and averaged through the normal
  postprocessor chain (clipping, DP noise, secure aggregation see the bank).
- the router is local (in the client's store entry, like fedsa's B) unless
  `model.personal.share_router`, then it is uploaded and averaged with the bank.

Every row of a batch is one client's (the executor hands one client's rows at a time), so the
executor's `route(rows)` call before each forward sets the bank's per-row weights.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from fedsim.baselines import MF_DIM, fit_mf, fit_mf_federated, mf_scores, mf_user_vectors
from fedsim.client.trainers.base import Adapter
from fedsim.core.capabilities import Capable
from fedsim.models import sequential_crm
from fedsim.models.bank import Bank, FusedBank, Router, routing_entropy
from fedsim.models.layout import lora_sites
from fedsim.models.lora import MODE_ROLES, set_flat

CRM_CACHE = 64  # clients whose fitted CRM an executor keeps in memory (a refit costs ~0.1 s; sequential ~1-5 s)
FED_MF_LOCAL_STEPS = 5  # crm_training federated: full-batch steps per client and round (x crm_rounds ~ MF_EPOCHS)
# Each CRM: (fit on a client's train rows, h_u of rows under the fit, h_u's size).
CRMS = {"mf": (lambda train, p, seed: fit_mf(train, seed), mf_user_vectors, MF_DIM + 1),
        "sequential": (lambda train, p, seed: sequential_crm.fit_sequential(train, seed, p.crm_history),
                       sequential_crm.sequential_user_vectors, sequential_crm.DIM)}
CRM_SCORES = {"mf": mf_scores, "sequential": sequential_crm.sequential_scores}  # the CRM alone: p(like) of rows


class Personal(Adapter):
    name = "personal"
    needs = {"whole_model_here": ("cannot be combined with {key} {value!r} (the bank and the router run in the "
                                  "client's whole model)")}
    breaks = {"per_sample_grads": ("cannot be combined with privacy.sample_dp (Opacus' per-sample hooks know peft's "
                                   "LoRA layers, not the bank's stacked ones); privacy.client_dp and privacy.dp_lora work"),
              "peft_lora_layers": ("cannot be combined with {key} {value!r} (the bank replaces the model's peft LoRA "
                                   "layers, which it merges)")}

    def build_layout(self):
        cfg = self.host.cfg
        p = cfg.model.personal
        self.bank = Bank(self.model, lora_sites(self.model), p.bank, p.merge, cfg.train.seed)
        device = self.bank.route.device
        self.fit_crm, self.user_vectors, dim = CRMS[p.crm]
        self.router = Router(dim, p.bank, p.router_hidden, p.temperature, cfg.train.seed).to(device)
        self.crms: dict[int, dict] = {}
        self._items = None  # crm_training federated: the shared item side, computed on first use
        self.entropy: list[float] = []  # per batch of the local run
        self.eval_entropy: list[np.ndarray] = []  # per row of an evaluation
        return self.bank.layout(MODE_ROLES[cfg.strategy.lora_mode], self.router,
                                "shared" if p.share_router else "local")

    # -- routing -----------------------------------------------------------------------------------

    def crm(self, client: int) -> dict:
        """The client's frozen CRM, fitted on its own train rows on first use."""
        if client not in self.crms:
            if len(self.crms) >= CRM_CACHE:
                self.crms.pop(next(iter(self.crms)))
            cfg = self.host.cfg
            train = self.host._train_rows(client)[0]
            if cfg.model.personal.crm_training == "federated":
                self.crms[client] = fit_mf(train, cfg.train.seed, items=self.shared_items())
            else:
                self.crms[client] = self.fit_crm(train, cfg.model.personal, cfg.train.seed)
        return self.crms[client]

    def shared_items(self) -> dict:
        """crm_training federated: the MF's item side after FedAvg over every client's train rows. A
        seeded pure function of the data, so each executor computes the same one (once, ~0.1 s a
        client and round) instead of shipping it; it is the stage before the LLM's rounds."""
        if self._items is None:
            cfg = self.host.cfg
            rows = [self.host._train_rows(c)[0] for c in range(cfg.clients.num)]
            self._items = fit_mf_federated([r for r in rows if len(r)], cfg.train.seed,
                                           cfg.model.personal.crm_rounds, FED_MF_LOCAL_STEPS)
        return self._items

    def user_h(self, rows: pd.DataFrame) -> torch.Tensor:
        """[rows, dim] each row's user vector under its client's frozen CRM (rows of one client)."""
        clients = rows["client"].unique()
        if len(clients) != 1:
            raise ValueError(f"personal: a batch holds the rows of clients {clients.tolist()}; the router runs one client's")
        return self.user_vectors(self.crm(int(clients[0])), rows).to(self.bank.route.device)

    def alpha(self, rows: pd.DataFrame) -> torch.Tensor:
        """[rows, N_m] router weights of each row's user (rows of one client)."""
        return self.router(self.user_h(rows))

    def fuse(self, num_clients: int) -> FusedBank:
        return FusedBank(self.bank, self.router, num_clients, self.params, self.user_h)

    def route(self, rows: pd.DataFrame) -> None:
        if self.bank.fused:  # fused training: the FusedBank routes each client's rows (`set_rows`)
            return
        alpha = self.alpha(rows)
        entropy = routing_entropy(alpha)
        if self.model.training:  # the local run's routing entropy (`metrics`)
            self.entropy.append(float(entropy.mean()))
        else:  # an evaluation's (`eval_metrics`)
            self.eval_entropy.append(entropy.cpu().numpy())
        self.bank.set(alpha)

    # -- the Adapter interface ---------------------------------------------------------------------

    def begin(self) -> None:
        self.entropy = []

    def metrics(self) -> dict:
        return {"personal/alpha_entropy": float(np.mean(self.entropy))} if self.entropy else {}

    def begin_eval(self) -> None:
        self.eval_entropy = []

    def eval_metrics(self) -> dict:
        """The mean entropy of the evaluated rows' alpha: how far from one meta-LoRA (0) or the
        uniform mix (log N_m) the routing is where the client is scored."""
        if not self.eval_entropy:
            return {}
        return {"personal/eval_alpha_entropy": float(np.concatenate(self.eval_entropy).mean())}

    def eval_scores(self, rows: pd.DataFrame) -> dict[str, np.ndarray]:
        """The client's own frozen CRM alone on its evaluated rows (`baseline/crm`), the comparison
        RecLoRA's bank has to beat: what the router reads, without the LLM."""
        if not len(rows):
            return {"crm": np.zeros(0)}
        client = int(rows["client"].iloc[0])
        crm = "mf" if self.host.cfg.model.personal.crm_training == "federated" else self.host.cfg.model.personal.crm
        return {"crm": np.asarray(CRM_SCORES[crm](self.crm(client), rows), dtype=np.float64)}

    def describe(self) -> dict:
        blocks = self.layout.blocks
        return {"personal/bank": self.bank.size,
                "personal/bank_params": sum(b.numel for b in blocks if b.adapter == "bank"),
                "personal/router_params": sum(b.numel for b in blocks if b.adapter == "router"),
                "personal/upload_params": sum(p.numel() for p in self.shared)}

    def export(self, params) -> tuple[dict, dict]:
        """The bank (and the router when shared) as trained; a local part (the routers, fedsa's
        B) as the uniform mean over the clients that trained, as fedsa exports its B."""
        set_flat(self.shared, params)
        if self.local:
            store = self.host.store
            parts = [s["local"] for c in range(self.host.cfg.clients.num)
                     if (s := store.latest(c)) is not None and "local" in s]
            set_flat(self.local, torch.stack(parts).mean(0) if parts else self.initial_local)
        state = self.bank.state()
        state.update({f"router.{n}": t.detach().cpu().contiguous() for n, t in self.router.state_dict().items()})
        lora = self.host.cfg.model.lora
        personal = self.host.cfg.model.personal
        router_input = {"mf": f"MF user vector ({MF_DIM}) and bias",
                        "sequential": f"sequential CRM's attention-pooled history ({sequential_crm.DIM})"}[personal.crm]
        config = {"fedsim_personal": vars(personal).copy(), "r": lora.r, "lora_alpha": lora.alpha,
                  "target_modules": list(lora.target_modules), "router_input": router_input}
        return state, config


class SharedRouter(Capable):
    """`model.personal.share_router: true`: the router's weights travel with the bank."""
    breaks = {"both_parts_uploaded": ("cannot be combined with privacy.dp_lora, which clips only the LoRA A and B "
                                      "parts of an upload; the shared router is neither (use privacy.client_dp, or "
                                      "keep the router local)")}
