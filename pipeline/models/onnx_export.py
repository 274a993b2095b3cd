"""``python -m pipeline onnx``: export trained weights to ONNX with a dynamic batch *and* dynamic
spatial axes (any multiple of the encoder's down-sampling factor, 8 for the bundle's SegResNet).

MONAI's ``monai.bundle onnx_export`` verb (with ``configs/onnx_export_args.json``) gives a dynamic
batch only: its ``converter_kwargs`` come from JSON, which cannot express ``torch.export`` dimension
objects; this command builds them. The file is checked before it is kept: ONNX Runtime on two
input sizes must agree with PyTorch to 1e-4 (printed). The bundle's metadata is stored in the
model (``metadata_props["metadata.json"]``).

    python -m pipeline onnx --ckpt runs/mtl/models/model.pt --out runs/mtl/models/model.onnx \\
        --config_file bundles/plgg_mtl/configs/inference.json configs/paper.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pipeline.io.errors import InputError
from pipeline.io.imageio import atomic_write

__all__ = ["export_onnx", "main"]

ROOT = Path(__file__).resolve().parents[2]
METADATA = ROOT / "bundles" / "plgg_mtl" / "configs" / "metadata.json"
OUTPUTS = ["seg_logits", "class_logits", "embedding"]


def export_onnx(network: torch.nn.Module, path: str | Path, channels: int, factor: int, example: list[int],
                metadata: dict | None = None, max_size: int = 1024, min_size: int = 1,
                dynamic_spatial: bool = True) -> float:
    """Export ``network`` (eval mode) to ``path``; returns the largest |ONNX Runtime - PyTorch| output
    difference over two checks (the example size, and batch 2 at another size, or at the same size
    when ``dynamic_spatial`` is False).

    Args:
        channels: input channels (image + coordinate channels).
        factor: every spatial size must be a multiple of it (2 ** number of down-samplings).
        example: spatial size traced (multiples of ``factor``), e.g. the training patch.
        metadata: stored in the model as ``metadata_props["metadata.json"]``.
        max_size: largest spatial size allowed.
        min_size: smallest spatial size allowed (rounded up to a multiple of ``factor``).
        dynamic_spatial: False fixes the spatial size to ``example`` (batch still free): for networks
            whose forward computes shape-dependent constants in Python (MONAI's SwinUNETR builds its
            shifted-window attention mask from the input size), which a trace bakes in.
    """
    import onnx
    from torch.export import Dim

    from pipeline.models.onnx_backend import OnnxNetwork

    network = network.eval()
    dims = [Dim(f"s{i}", min=max(1, -(-min_size // factor)), max=max_size // factor) for i in range(len(example))]
    shapes = {"x": {0: Dim("batch", min=1, max=1024),
                    **({2 + i: factor * d for i, d in enumerate(dims)} if dynamic_spatial else {})}}
    x = torch.randn(1, channels, *example)

    names = OUTPUTS + (["reconstruction"] if getattr(network, "reconstruct", False) else [])
    if getattr(network, "detect", False):  # the detection head's raw maps (decoding: docs/how-to/detection.md)
        levels = list(network.det_levels)
        names += [f"det_class_level{lv}" for lv in levels] + [f"det_box_level{lv}" for lv in levels]
    # the sizes the file accepts, read back by pipeline.models.onnx_backend.OnnxNetwork (its checks, and the
    # padding of a whole-volume classification)
    props = {"spatial_factor": str(factor if dynamic_spatial else 0), "spatial_min": str(min_size)}
    if metadata is not None:
        props["metadata.json"] = json.dumps(metadata)

    def write(tmp: str) -> None:
        torch.onnx.export(network, (x,), tmp, dynamo=True, dynamic_shapes=shapes, input_names=["image"],
                          output_names=names)
        model = onnx.load(tmp)
        onnx.helper.set_model_props(model, props)
        onnx.save(model, tmp)

    path = atomic_write(Path(path), write, ".onnx")
    exported = OnnxNetwork(path)  # the same ONNX Runtime wrapper inference uses
    worst = 0.0
    step = factor if dynamic_spatial else 0
    for shape in ([1, channels, *example], [2, channels, *[s + step for s in example]]):
        xi = torch.randn(*shape)
        with torch.no_grad():
            ref = _flat(network(xi))
        got = exported(xi)
        worst = max(worst, *(float((r.float() - g).abs().max()) for r, g in zip(ref, got, strict=True)))
    if worst > 1e-4:
        path.unlink()
        raise RuntimeError(f"ONNX Runtime and PyTorch disagree by {worst:.2e} on the export of {path}: not kept")
    return worst


def _flat(outputs: tuple) -> list[torch.Tensor]:
    """The network's outputs as the ONNX file lists them: the detection head's list spread out."""
    flat: list[torch.Tensor] = []
    for o in outputs:
        flat.extend(o if isinstance(o, list | tuple) else [o])
    return flat


def main(argv: list[str] | None = None) -> int:
    from monai.bundle import ConfigParser

    from pipeline.models.weights import describe_inputs, load_weights

    p = argparse.ArgumentParser(prog="python -m pipeline onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="model.pt (or checkpoint_epoch=N.pt) of a training run")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--config_file", nargs="+", default=[str(ROOT / "bundles/plgg_mtl/configs/inference.json")],
                   help="inference.json and the overlay the model was trained with")
    a = p.parse_args(argv)
    for f in a.config_file:
        if not Path(f).is_file():
            raise InputError(f, "config file not found")
    parser = ConfigParser()
    parser.read_config(a.config_file)
    parser["ckpt"] = a.ckpt  # the sequences the model takes are recorded beside it (models/inputs.json)
    network = load_weights(parser.get_parsed_content("network_def"), a.ckpt)
    if int(getattr(network, "spatial_dims", 3)) != 3:
        raise InputError(a.config_file[-1], "ONNX export is for 3-D networks; this overlay's network is 2-D "
                         "(spatial_dims 2): infer it with the PyTorch checkpoint")
    channels = int(parser.get_parsed_content("in_channels")) + int(parser.get_parsed_content("coord_channels"))
    # the backbone adapters declare the sizes their padding traces statically (export_factor)
    factor = int(getattr(network, "export_factor", max(int(getattr(network, "downsampling", 8)), 8)))
    min_size = int(getattr(network, "export_min_size", 1))
    dynamic = bool(getattr(network, "export_dynamic_spatial", True))
    patch = [int(s) for s in parser.get_parsed_content("patch_size")]
    bad = [s for s in patch if dynamic and (s % factor or s < min_size)]
    if bad:
        raise InputError(a.config_file[-1], f"patch_size {patch}: ONNX export of this network needs sizes that "
                         f"are multiples of {factor} and at least {min_size}")
    sequences = list(parser.get_parsed_content("input_sequences"))
    metadata = describe_inputs(json.loads(METADATA.read_text(encoding="utf-8")), sequences,
                               int(parser.get_parsed_content("coord_channels")))
    worst = export_onnx(network, a.out, channels, factor, patch, metadata, min_size=min_size,
                        dynamic_spatial=dynamic)
    sizes = (f"x, y, z multiples of {factor} from {max(min_size, factor)}" if dynamic else
             f"x, y, z = {patch} (this backbone's trace fixes the spatial size; inference feeds only patch_size)")
    print(f"[onnx] {a.out}: inputs (batch, {channels}, x, y, z): {', '.join(sequences)} and "
          f"{channels - len(sequences)} coordinate channel(s), with {sizes}; ONNX Runtime agrees with PyTorch to "
          f"{worst:.1e} (checked at {patch} and batch 2{f' at +{factor}' if dynamic else ''})")
    return 0
