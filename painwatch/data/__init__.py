"""Frames, manifests, validation, hashes, splits by individual, provenance, transforms, face crops,
video sampling and the synthetic demo set.

The public names below are loaded on first use (PEP 562), so that the command line's ``--help``, which
reads the demo set's defaults, does not pay for importing torch, OpenCV or albumentations; the
``TYPE_CHECKING`` block below names every module they come from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from painwatch.lazy import lazy_attributes

_EXPORTS: dict[str, str] = {
    # errors
    "DataValidationError": "painwatch.data.errors",
    "ImageReadError": "painwatch.data.errors",
    "Problem": "painwatch.data.errors",
    "PROBLEM_KINDS": "painwatch.data.errors",
    # images
    "read_image": "painwatch.data.images",
    "probe_image": "painwatch.data.images",
    "crop_face": "painwatch.data.images",
    "check_box": "painwatch.data.images",
    "Detector": "painwatch.data.images",
    "Box": "painwatch.data.images",
    "IMAGE_EXTENSIONS": "painwatch.data.images",
    "VIDEO_EXTENSIONS": "painwatch.data.images",
    "DEFAULT_MAX_PIXELS": "painwatch.data.images",
    "centre_square": "painwatch.data.images",
    # video
    "sample_video": "painwatch.data.video",
    "sample_times": "painwatch.data.video",
    "read_video_frame": "painwatch.data.video",
    "read_video_frames": "painwatch.data.video",
    "video_info": "painwatch.data.video",
    "VideoInfo": "painwatch.data.video",
    # records
    "FrameRecord": "painwatch.data.records",
    "load_records": "painwatch.data.sources",
    "load_frame": "painwatch.data.records",
    "parse_label": "painwatch.data.records",
    "records_from_video": "painwatch.data.records",
    "MANIFEST_NAME": "painwatch.data.records",
    # validation
    "ValidationReport": "painwatch.data.validation",
    "validate_source": "painwatch.data.validation",
    # hashing
    "dataset_hash": "painwatch.data.hashing",
    "file_sha256": "painwatch.data.hashing",
    "records_digest": "painwatch.data.hashing",
    # splits by individual
    "Fold": "painwatch.data.splits",
    "fold_seed": "painwatch.data.splits",
    "held_out_individuals": "painwatch.data.splits",
    "loio_folds": "painwatch.data.splits",
    "split_by_individual": "painwatch.data.splits",
    # provenance
    "is_synthetic": "painwatch.data.provenance",
    # transforms and dataset
    "train_transform": "painwatch.data.transforms",
    "eval_transform": "painwatch.data.transforms",
    "ImageTransform": "painwatch.data.transforms",
    "DEFAULT_SIZE": "painwatch.data.transforms",
    "FrameDataset": "painwatch.data.dataset",
    # synthetic demo set
    "make_demo_dataset": "painwatch.data.synthetic",
    "render_face": "painwatch.data.synthetic",
    "DEMO_IMAGE_SIZE": "painwatch.data.synthetic",
    "DEMO_FRAMES_PER_CLASS": "painwatch.data.synthetic",
}

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_SIZE",
    "DEMO_FRAMES_PER_CLASS",
    "DEMO_IMAGE_SIZE",
    "IMAGE_EXTENSIONS",
    "MANIFEST_NAME",
    "PROBLEM_KINDS",
    "VIDEO_EXTENSIONS",
    "Box",
    "DataValidationError",
    "Detector",
    "Fold",
    "FrameDataset",
    "FrameRecord",
    "ImageReadError",
    "ImageTransform",
    "Problem",
    "ValidationReport",
    "VideoInfo",
    "centre_square",
    "check_box",
    "crop_face",
    "dataset_hash",
    "eval_transform",
    "file_sha256",
    "fold_seed",
    "held_out_individuals",
    "is_synthetic",
    "load_frame",
    "load_records",
    "loio_folds",
    "make_demo_dataset",
    "parse_label",
    "probe_image",
    "read_image",
    "read_video_frame",
    "read_video_frames",
    "records_digest",
    "records_from_video",
    "render_face",
    "sample_times",
    "sample_video",
    "split_by_individual",
    "train_transform",
    "validate_source",
    "video_info",
]


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, namespace=globals(), public=__all__)


if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from painwatch.data.dataset import FrameDataset
    from painwatch.data.errors import PROBLEM_KINDS, DataValidationError, ImageReadError, Problem
    from painwatch.data.hashing import dataset_hash, file_sha256, records_digest
    from painwatch.data.images import (
        DEFAULT_MAX_PIXELS,
        IMAGE_EXTENSIONS,
        VIDEO_EXTENSIONS,
        Box,
        Detector,
        centre_square,
        check_box,
        crop_face,
        probe_image,
        read_image,
    )
    from painwatch.data.provenance import is_synthetic
    from painwatch.data.records import (
        MANIFEST_NAME,
        FrameRecord,
        load_frame,
        parse_label,
        records_from_video,
    )
    from painwatch.data.sources import load_records
    from painwatch.data.splits import Fold, fold_seed, held_out_individuals, loio_folds, split_by_individual
    from painwatch.data.synthetic import (
        DEMO_FRAMES_PER_CLASS,
        DEMO_IMAGE_SIZE,
        make_demo_dataset,
        render_face,
    )
    from painwatch.data.transforms import DEFAULT_SIZE, ImageTransform, eval_transform, train_transform
    from painwatch.data.validation import ValidationReport, validate_source
    from painwatch.data.video import (
        VideoInfo,
        read_video_frame,
        read_video_frames,
        sample_times,
        sample_video,
        video_info,
    )
