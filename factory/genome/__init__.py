"""Architecture genomes: schema, integer codec and repair, reference genomes, static metrics."""

from factory.genome.codec import GenomeCodec, repair
from factory.genome.schema import Genome, GenomeError, LayerGene

__all__ = ["Genome", "GenomeCodec", "GenomeError", "LayerGene", "repair"]
