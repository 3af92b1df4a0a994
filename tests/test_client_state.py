"""Idle clients' state as flat buffers (fedsim.client.state): exact optimizer round trips and the
per-client versioned store."""
import pytest
import torch

from fedsim.client.state import ClientStore, flat_to_opt_state, opt_state_to_flat


def lora_like_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 16), (16, 4), (4, 16), (8, 4)]  # A, B, A, B of two LoRA layers
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def steps(params, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        loss = sum((p * torch.randn(p.shape, generator=g)).sum() ** 2 for p in params)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_flat_optimizer_state_resumes_training_bit_for_bit(amsgrad):
    """Training 3 steps, saving flat, restoring into a fresh AdamW and training 2 more gives exactly
    the parameters of 5 uninterrupted steps."""
    ref = lora_like_params()
    opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    steps(ref, opt, 3, seed=1)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    flat = opt_state_to_flat(opt)
    steps(ref, opt, 2, seed=2)

    n = sum(p.numel() for p in resumed)
    kinds = {"exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    assert set(flat) == {"step"} | kinds
    for k in kinds:  # one contiguous float32 vector per kind over all parameters
        assert flat[k].shape == (n,) and flat[k].dtype == torch.float32 and flat[k].is_contiguous()
    assert flat["step"].tolist() == [3.0] * 4

    opt2 = torch.optim.AdamW(resumed, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    flat_to_opt_state(opt2, flat)
    steps(resumed, opt2, 2, seed=2)
    for a, b in zip(ref, resumed):
        assert torch.equal(a, b)


def test_parameters_without_state_stay_without_state():
    params = lora_like_params()
    opt = torch.optim.AdamW(params, lr=1e-2)
    params[0].sum().backward()  # only the first parameter gets a gradient
    opt.step()
    flat = opt_state_to_flat(opt)
    assert flat["step"].tolist() == [1.0, -1.0, -1.0, -1.0]
    fresh = lora_like_params()
    opt2 = torch.optim.AdamW(fresh, lr=1e-2)
    flat_to_opt_state(opt2, flat)
    assert fresh[0] in opt2.state and all(p not in opt2.state for p in fresh[1:])
    assert torch.equal(opt2.state[fresh[0]]["exp_avg"], opt.state[params[0]]["exp_avg"])


def test_flat_state_of_another_adapter_is_refused():
    opt = torch.optim.AdamW(lora_like_params(), lr=1e-2)
    steps(opt.param_groups[0]["params"], opt, 1, seed=0)
    flat = opt_state_to_flat(opt)
    smaller = torch.optim.AdamW(lora_like_params()[:3], lr=1e-2)
    with pytest.raises(ValueError, match="covers 4 parameter tensors, the optimizer has 3"):
        flat_to_opt_state(smaller, flat)
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(5)) for _ in range(4)], lr=1e-2)
    with pytest.raises(ValueError, match="'exp_avg' has 224 entries, the parameters have 20"):
        flat_to_opt_state(other, flat)


def test_store_keeps_two_versions_per_client_in_its_own_directory(tmp_path):
    store = ClientStore(tmp_path / "client_state")
    local = torch.arange(6, dtype=torch.float32)
    for r in (0, 2, 5):
        store.save(7, r, {"local": local + r})
    store.save(8, 1, {"local": local})
    assert sorted(p.name for p in store.client_dir(7).iterdir()) == ["r2.pt", "r5.pt"]
    assert torch.equal(store.load(7, 6)["local"], local + 5)
    assert torch.equal(store.load(7, 5)["local"], local + 2)  # what round 5 started from
    assert store.load(7, 2) is None  # round 0's version is gone (only the newest two are kept)
    assert store.load(3, 10) is None  # never trained
    assert store.clients() == [7, 8]
    assert store.load(7, 6)["format"] == 2
    assert store.disk_bytes(7) == sum(p.stat().st_size for p in store.client_dir(7).iterdir())


def test_prune_leaves_each_client_the_entry_a_resume_from_the_checkpoint_reads(tmp_path):
    store = ClientStore(tmp_path / "client_state")
    for r in (1, 3):
        store.save(0, r, {"local": torch.full((2,), float(r))})
    store.save(1, 2, {"local": torch.zeros(2)})
    store.prune([0, 1, 5], through_round=3)  # 5 never trained: nothing to do
    assert [p.name for p in store.client_dir(0).iterdir()] == ["r3.pt"]
    assert [p.name for p in store.client_dir(1).iterdir()] == ["r2.pt"]
    store.save(0, 4, {"local": torch.full((2,), 4.0)})  # round 4 runs; its checkpoint is not written yet
    store.prune([0], through_round=3)
    assert torch.equal(store.load(0, 4)["local"], torch.full((2,), 3.0))  # what a resume at round 4 reads
