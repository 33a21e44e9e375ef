"""Datasets: concept datasets (Broden, synthetic concepts), image folders, sample photographs."""

from .broden import Broden, BrodenLabel, encode_label_png, read_label_png
from .concepts import Concept, ConceptDataset, collate, item_categories, rgb_to_tensor
from .images import ImageFolder, SampleImages, read_image
from .sources import open_dataset, resolve_data
from .synthetic import PALETTE, SyntheticConcepts
from .writer import write_broden

__all__ = [
    "PALETTE",
    "Broden",
    "BrodenLabel",
    "Concept",
    "ConceptDataset",
    "ImageFolder",
    "SampleImages",
    "SyntheticConcepts",
    "collate",
    "encode_label_png",
    "item_categories",
    "open_dataset",
    "read_image",
    "read_label_png",
    "resolve_data",
    "rgb_to_tensor",
    "write_broden",
]
