import pytest
import torch

from lift3d.optim import adam, fusable


def _quadratic_steps(optimizer, params, steps=20):
    target = [torch.linspace(-1, 1, p.numel()).view_as(p) for p in params]
    for _ in range(steps):
        optimizer.zero_grad()
        sum(((p - t) ** 2).sum() for p, t in zip(params, target)).backward()
        optimizer.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_fused_on_cpu_and_the_same_updates_as_the_default(decoupled):
    def make():
        g = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (1000, 7)]

    params = make()
    optimizer = adam([{"params": [params[0]], "lr": 0.05}, {"params": [params[1]], "lr": 0.01}], eps=1e-15,
                     weight_decay_decoupled=decoupled)
    assert isinstance(optimizer, torch.optim.AdamW if decoupled else torch.optim.Adam)
    assert all(group["fused"] for group in optimizer.param_groups)
    reference_params = make()
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    reference = kind([{"params": [reference_params[0]], "lr": 0.05}, {"params": [reference_params[1]], "lr": 0.01}],
                     eps=1e-15, foreach=False)
    got = _quadratic_steps(optimizer, params)
    expected = _quadratic_steps(reference, reference_params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the same state keys, so checkpoints load either way
    assert optimizer.state[params[0]].keys() == reference.state[reference_params[0]].keys()
    reference.load_state_dict(optimizer.state_dict())


def test_not_fused_where_a_parameter_does_not_allow_it():
    assert not fusable([])
    assert not fusable([torch.zeros(3, dtype=torch.complex64), torch.zeros(3)])
    assert fusable([torch.zeros(3), torch.zeros(2, dtype=torch.float64)])
    optimizer = adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    assert not optimizer.param_groups[0]["fused"]
