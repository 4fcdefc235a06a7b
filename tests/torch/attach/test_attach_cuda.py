"""``ema.attach(optimizer)`` on a GPU: a capturable AdamW's step captured in a CUDA graph with the
attached update inside (the plan on the device), replayed, against the same average updated by
hand in eager steps; a fused AdamW under GradScaler with inf gradients leaves the average as it
was, with no host sync in the step (torch CUDA)."""
import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="hardware: CUDA graphs, capturable and fused optimizers")]


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).cuda()


def test_a_captured_capturable_step_updates_the_attached_average_on_every_replay():
    from fastema.torch import EMA

    a, b = net(), net()
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, capturable=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, capturable=True)
    ema = EMA(a, 0.9, device_step=True).attach(opt_a)
    by_hand = EMA(b, 0.9, device_step=True)
    xs = [torch.randn(8, 16, device="cuda") for _ in range(6)]
    x = xs[0].clone()                              # the graph's input: the warm-up step reads xs[0]

    def step():
        opt_a.zero_grad(set_to_none=False)
        a(x).square().mean().backward()
        opt_a.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()                                     # recorded, not run
    for i, xi in enumerate(xs):                    # i = 0: the eager warm-up step's twin
        if i:
            x.copy_(xi)
            graph.replay()
        opt_b.zero_grad(set_to_none=False)
        b(xi).square().mean().backward()
        opt_b.step()
        by_hand.update()
    torch.cuda.synchronize()
    assert ema.state_dict()["updates"] == by_hand.state_dict()["updates"]
    for n, t in ema.state_dict()["averaged"].items():
        torch.testing.assert_close(t, by_hand.state_dict()["averaged"][n], rtol=1e-5, atol=1e-6)


def test_a_fused_step_skipped_by_gradscaler_writes_nothing_and_syncs_nothing():
    from fastema.torch import EMA

    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ema = EMA(model, 0.9, device_step=False).attach(opt)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(8, 16, device="cuda")
    scaler.scale(model(x).square().mean()).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    before = {k: v.clone() for k, v in ema.state_dict()["averaged"].items()}
    scaler.scale(model(x).square().mean() * float("inf")).backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scaler.step(opt)                           # the hook: found_inf copied on the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    scaler.update()
    assert all(torch.equal(v, ema.state_dict()["averaged"][k]) for k, v in before.items())
