"""Models for parity checks and benchmarks: genomes shrunk to the fewest layers that still show every operator
class, and untrained models with every branch active."""

from __future__ import annotations

import dataclasses

import torch

from factory.genome.schema import Genome
from factory.model import LIVModel


def shrink(genome: Genome, d_model: int = 64, min_layers: int = 2) -> Genome:
    """The shortest prefix of the layers in which every operator class appears (at least `min_layers`)."""
    seen, keep = set(), 0
    for i, layer in enumerate(genome.layers):
        if layer.op_class not in seen:
            seen.add(layer.op_class)
            keep = i + 1
    keep = min(genome.n_layers, max(keep, min_layers))
    return dataclasses.replace(genome, d_model=d_model, layers=genome.layers[:keep]).validate()


def perturbed_model(genome: Genome, seed: int = 0, scale: float = 0.02) -> LIVModel:
    """A model with random noise added to every parameter, so zero-initialised branches (shortcuts, gates) are
    exercised too."""
    torch.manual_seed(seed)
    model = LIVModel(genome).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model
