"""Datasets: plain image folders, the bundled real photographs (concept datasets to come)."""

from .images import ImageFolder, SampleImages, open_images, read_image

__all__ = ["ImageFolder", "SampleImages", "open_images", "read_image"]
