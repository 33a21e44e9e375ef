"""Datasets: concept datasets (Broden, your own segmentation folders, COCO, synthetic
concepts), Broden's download and resizing, image folders, sample photographs."""

from .broden import Broden, BrodenLabel, encode_label_png, read_label_png
from .check import CategoryCheck, ConceptCheck, DatasetCheck, check_dataset
from .coco import CocoConcepts
from .concepts import Concept, ConceptDataset, collate, item_categories, rgb_to_tensor
from .download import download_broden
from .images import ImageFolder, SampleImages, read_image
from .resize import ResizedConcepts, resize_dataset
from .segmentation_folder import SegmentationFolder
from .sources import open_dataset, resolve_data
from .synthetic import PALETTE, SyntheticConcepts
from .writer import write_broden

__all__ = [
    "PALETTE",
    "Broden",
    "BrodenLabel",
    "CategoryCheck",
    "CocoConcepts",
    "Concept",
    "ConceptCheck",
    "ConceptDataset",
    "DatasetCheck",
    "ImageFolder",
    "ResizedConcepts",
    "SampleImages",
    "SegmentationFolder",
    "SyntheticConcepts",
    "check_dataset",
    "collate",
    "download_broden",
    "encode_label_png",
    "item_categories",
    "open_dataset",
    "read_image",
    "read_label_png",
    "resize_dataset",
    "resolve_data",
    "rgb_to_tensor",
    "write_broden",
]
