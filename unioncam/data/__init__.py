"""Data: the bundled real-photo sample (and, later, WebDataset shards)."""

from unioncam.data.sample import SAMPLE_PHOTOS, sample_photo_paths

__all__ = ["SAMPLE_PHOTOS", "sample_photo_paths"]
