"""Lesion boxes of a mask, on hand-made masks whose boxes are worked out by hand."""

from __future__ import annotations

import numpy as np

from pipeline.data.boxes import lesion_boxes


def test_one_box_per_lesion_above_the_volume_threshold() -> None:
    m = np.zeros((40, 40, 40), bool)
    m[2:8, 3:9, 4:10] = True  # 216 voxels
    m[20:23, 25:30, 30:34] = True  # 60 voxels
    m[35, 35, 35] = True  # a speck of 1 voxel
    boxes = lesion_boxes(m, spacing=(1.0, 1.0, 1.0), min_volume_mm3=50.0)
    assert boxes.tolist() == [[2, 3, 4, 8, 9, 10], [20, 25, 30, 23, 30, 34]]
    # at 2 mm the 60-voxel lesion is 480 mm^3 and the speck 8 mm^3: still two boxes
    assert len(lesion_boxes(m, spacing=(2.0, 2.0, 2.0), min_volume_mm3=50.0)) == 2
    assert len(lesion_boxes(m, spacing=(1.0, 1.0, 1.0), min_volume_mm3=0.0)) == 3


def test_voxels_touching_at_a_corner_are_one_lesion() -> None:
    m = np.zeros((10, 10, 10), bool)
    m[2, 2, 2] = m[3, 3, 3] = True
    assert lesion_boxes(m, min_volume_mm3=0.0).tolist() == [[2, 2, 2, 4, 4, 4]]
    assert lesion_boxes(np.zeros((5, 5, 5)), min_volume_mm3=0.0).shape == (0, 6)
