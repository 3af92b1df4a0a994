import ray
import torch

from fedsim.config import load_config
from fedsim.server.aggregator import Aggregator
from fedsim.server.strategy import FedAvg, Update, weighted_mean


def test_fedavg_is_the_sample_weighted_mean_of_deltas():
    g = torch.randn(1000)
    deltas = [torch.randn(1000) for _ in range(3)]
    counts = [10, 30, 60]
    s = FedAvg()
    s.initialize(g, 3)
    s.aggregate(0, [Update(i, d, n, n) for i, (d, n) in enumerate(zip(deltas, counts))])
    want = g + (0.1 * deltas[0] + 0.3 * deltas[1] + 0.6 * deltas[2])
    assert torch.allclose(s.params_for(2), want, atol=1e-6)
    # Order of clients does not matter.
    s2 = FedAvg()
    s2.initialize(g, 3)
    s2.aggregate(0, [Update(i, d, n, n) for i, d, n in reversed(list(zip(range(3), deltas, counts)))])
    assert torch.allclose(s.params, s2.params, atol=1e-7)


def test_weighted_mean_of_equal_vectors_is_exact():
    v = torch.full((5,), 0.1)
    assert torch.equal(weighted_mean([v, v, v], [1, 2, 3]), v)


def test_aggregator_actor_counts_traffic_and_aggregates(ray_local):
    cfg = load_config("configs/tiny.yaml")
    agg = ray.remote(Aggregator).options(num_cpus=0).remote(cfg, torch.zeros(10))
    refs = ray.get(agg.params_for.remote([0, 1, 2]))
    assert len({r.hex() for r in refs.values()}) == 1  # one broadcast object for all clients
    metas = [{"client": 0, "num_samples": 1, "weight": 1.0}, {"client": 1, "num_samples": 3, "weight": 3.0}]
    m = ray.get(agg.aggregate.remote(0, [0, 1, 2], metas, torch.ones(10), torch.full((10,), 2.0)))
    assert m["bytes_up"] == 2 * 10 * 4 and m["bytes_down"] == 3 * 10 * 4
    assert torch.allclose(ray.get(agg.global_params.remote()), torch.full((10,), 1.75))
    ray.kill(agg)
