"""Data: WebDataset shards of ILSVRC2012 val, VOC2007 test and the offline real-photo sample."""

from unioncam.data.sample import SAMPLE_PHOTOS, sample_photo_paths, write_sample_shards
from unioncam.data.shards import expand_shards, iter_samples, write_shards

__all__ = ["SAMPLE_PHOTOS", "expand_shards", "iter_samples", "sample_photo_paths", "write_sample_shards",
           "write_shards"]
