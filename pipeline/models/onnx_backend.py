"""Inference through ONNX Runtime: an exported ``model.onnx`` behind the network's interface.

Export with MONAI's own verb (dynamic batch; the spatial size is the training patch, which is the
sliding-window ROI and the classification patch, so inference never feeds another size)::

    python -m monai.bundle onnx_export network_def --filepath model.onnx --ckpt_file models/model.pt \\
        --meta_file bundles/plgg_mtl/configs/metadata.json \\
        --config_file "['bundles/plgg_mtl/configs/inference.json','configs/demo.json']" \\
        --input_shape "[1, 4, 48, 48, 48]" --args_file bundles/plgg_mtl/configs/onnx_export_args.json

then infer with ``--ckpt model.onnx`` (``backend`` ``auto`` picks ONNX Runtime from the suffix).
:class:`OnnxNetwork` returns what the PyTorch network returns, ``(seg_logits, class_logits,
embedding)`` as torch tensors, so the sliding window, the classification patch and everything after
them are unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.io.errors import InputError

__all__ = ["OnnxNetwork"]


class OnnxNetwork(nn.Module):
    """An ONNX Runtime session as a module: ``(B, C, *S) float32 -> tuple of the model's outputs``.

    Args:
        path: the ``.onnx`` file.
        device: ``cuda`` uses ONNX Runtime's CUDA provider when installed, else its CPU provider.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise InputError(path, "an ONNX model needs onnxruntime: pip install onnxruntime") from None
        device = torch.device(device)
        available = ort.get_available_providers()
        providers = (["CUDAExecutionProvider"] if device.type == "cuda" and "CUDAExecutionProvider" in available
                     else []) + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # noqa: BLE001 - any loading problem is a bad file
            raise InputError(path, f"cannot be loaded by ONNX Runtime: {str(exc).splitlines()[0][:200]}") from None
        inp = self.session.get_inputs()[0]
        self.path = Path(path)
        self.input_name = inp.name
        self.input_shape = list(inp.shape)
        self.output_names = [o.name for o in self.session.get_outputs()]
        # written by ``python -m pipeline onnx``: free spatial sizes are multiples of
        # spatial_factor from spatial_min; absent (MONAI's verb, older files): the encoder's 8
        props = self.session.get_modelmeta().custom_metadata_map
        self.spatial_factor = int(props.get("spatial_factor", 0))
        self.spatial_min = int(props.get("spatial_min", 1))
        self.downsampling = self.spatial_factor or 8  # what a whole-volume classification pads to

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        expected = self.input_shape[1:]
        got = list(x.shape[1:])
        if any(isinstance(e, int) and e != g for e, g in zip(expected, got, strict=True)):
            raise InputError(self.path, f"exported for inputs of (batch, {', '.join(map(str, expected))}), given "
                                        f"(batch, {', '.join(map(str, got))}): export it with --input_shape "
                                        f"[1, {', '.join(map(str, got))}] (the overlay's patch_size)")
        if self.spatial_factor and any(g % self.spatial_factor or g < self.spatial_min for g in got[1:]):
            raise InputError(self.path, f"exported for spatial sizes that are multiples of {self.spatial_factor} "
                                        f"from {self.spatial_min}, given {', '.join(map(str, got[1:]))}")
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        outputs = self.session.run(self.output_names, {self.input_name: array})
        return tuple(torch.from_numpy(o).to(x.device) for o in outputs)
