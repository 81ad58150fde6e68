"""The three networks: shapes, the paper's VGG-16 layout (7680 flatten, 10.85 M params), FLOPs."""

from __future__ import annotations

import pytest
import torch

from xrdmatch.training.networks import NETWORKS, build_network, count_flops, count_params


def test_vgg16_paper_matches_the_authors_layout():
    net = build_network("vgg16_paper").eval()
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv1d)]
    assert [c.kernel_size[0] for c in convs] == [16, 16, 12, 12, 8, 8, 4, 4]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert [c.stride[0] for c in convs] == [2, 1] * 4
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in net.features) == 8
    assert sum(isinstance(m, torch.nn.MaxPool1d) for m in net.features) == 4
    assert sum(isinstance(m, torch.nn.Dropout) for m in net.features) == 4
    with torch.no_grad():
        feat = net.features(torch.zeros(2, 1, 4501))
    assert feat.shape == (2, 512, 15) and feat[0].numel() == 7680
    linears = [m for m in net.classifier if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(7680, 1024), (1024, 256), (256, 2)]
    assert count_params(net) == 10_854_786  # the paper's 10.85 M
    assert round(count_params(net) / 1e6, 2) == 10.85


@pytest.mark.parametrize("name", NETWORKS)
def test_every_network_maps_patterns_to_two_logits(name):
    net = build_network(name).eval()
    with torch.no_grad():
        a = net(torch.rand(3, 4501))
        b = net(torch.rand(3, 1, 4501))
    assert a.shape == b.shape == (3, 2) and torch.isfinite(a).all()


def test_flops_and_params_order():
    flops = {n: count_flops(n) for n in NETWORKS}
    params = {n: count_params(build_network(n)) for n in NETWORKS}
    assert flops["fast"] * 50 < flops["vgg16_paper"] < flops["vgg11"]
    assert params["fast"] < 100_000 < params["vgg11"] < params["vgg16_paper"]
    # conv1 of vgg16_paper alone: 2 * 64 * 16 * 2244 MACs
    assert flops["vgg16_paper"] > 2 * 64 * 16 * 2244


def test_unknown_network_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown network 'resnet'"):
        build_network("resnet")
