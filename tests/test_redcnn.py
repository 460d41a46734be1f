import pytest
import torch

from langmamba.baselines import REDCNN


def test_shapes_any_size_and_parameter_count():
    model = REDCNN()
    # 10 layers of 96 5x5 maps: 96*25 + 4*(96*96*25) (enc) + 4*(96*96*25) + 96*25 (dec) weights + biases
    expected = 2 * 96 * 25 + 8 * 96 * 96 * 25 + 9 * 96 + 1
    assert sum(p.numel() for p in model.parameters()) == expected
    for shape in [(2, 1, 64, 64), (1, 1, 37, 50)]:
        assert model(torch.rand(shape)).shape == shape


@pytest.mark.slow
def test_learns_to_remove_noise_on_a_tiny_problem():
    torch.manual_seed(0)
    model = REDCNN(channels=16)
    clean = torch.rand(4, 1, 32, 32).cumsum(-1) / 32
    noisy = clean + 0.05 * torch.randn_like(clean)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = torch.mean((model(noisy) - clean) ** 2).item()
    for _ in range(60):
        optimizer.zero_grad()
        loss = torch.mean((model(noisy) - clean) ** 2)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * start
