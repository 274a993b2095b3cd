"""Cases with a missing mask or class go through the same transform chain as the others."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["FillMissingMaskd"]


class FillMissingMaskd(MapTransform):
    """Replace the mask of a case without one (``flag_key == 0``) by zeros shaped like the image.

    The datalist puts the image path in ``label`` as a placeholder (so ``LoadImaged`` has a file
    and every later spatial transform treats both alike); this transform zeroes it. The loss
    and the metrics use ``flag_key`` to leave such cases out of the segmentation term. MONAI has
    no transform for an optional key with a same-shaped default, hence this one.

    Args:
        keys: mask key(s), e.g. ``"label"``.
        image_key: key whose shape/meta the zeros copy.
        flag_key: per-case 0/1 saying whether a real mask exists.
    """

    def __init__(self, keys: KeysCollection = "label", image_key: str = "image", flag_key: str = "has_label") -> None:
        super().__init__(keys)
        self.image_key = image_key
        self.flag_key = flag_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if int(d.get(self.flag_key, 1)) == 0:
            for key in self.key_iterator(d):
                img = d[self.image_key]
                d[key] = torch.zeros_like(img) if isinstance(img, torch.Tensor) else img * 0
        return d
