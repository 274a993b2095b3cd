"""Cases with a missing mask or class go through the same transform chain as the others."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["FillMissingMaskd"]


class FillMissingMaskd(MapTransform):
    """Give a case without a mask (key absent, or ``flag_key == 0``) an all-zero mask shaped like
    the image, and set ``flag_key`` accordingly.

    Every item of a batch then has the same keys (so it collates) and later spatial transforms
    treat all cases alike; the loss and the metrics use ``flag_key`` to leave such cases out of
    the segmentation term. MONAI has no transform for an optional key with a same-shaped
    default, hence this one.

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
        for key in self.keys:
            if key not in d or int(d.get(self.flag_key, 1)) == 0:
                img = d[self.image_key]
                d[key] = torch.zeros_like(img) if isinstance(img, torch.Tensor) else img * 0
                d[self.flag_key] = 0
        return d
