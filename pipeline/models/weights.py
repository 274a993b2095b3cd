"""Reading trained weights: a checkpoint of this bundle, or one clear reason why a file is not one.

Used by inference (:func:`load_network`), evaluation (``evaluate.json`` loads the weights with
:func:`load_weights` before the evaluator is built: MONAI's ``CheckpointLoader`` would take a nested
``checkpoint_epoch=N.pt`` for a plain state dict) and the post-training decisions. ``torch.load`` alone answers a foreign or
corrupt file with an explanation of its ``weights_only`` default or a zip-archive error; here every
such file is "not a checkpoint of this bundle", with what it is instead.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from pipeline.io.errors import InputError
from pipeline.io.filecheck import check_entry
from pipeline.runtime.distributed import unwrap

__all__ = ["INPUTS_FILE", "state_dict_of", "read_weights", "load_weights", "load_network", "record_inputs",
           "describe_inputs", "trained_sequences"]

#: Beside a run's ``model.pt``: which sequences, in which order, the network takes.
INPUTS_FILE = "inputs.json"

_NOT_OURS = "is not a checkpoint of this bundle"
_WHICH = "use OUTPUT_DIR/models/model.pt (or a checkpoint_epoch=N.pt) of a training run"


def state_dict_of(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The network weights in a checkpoint: a plain state dict (``model.pt`` of a training run) or
    one nested under ``network`` / ``model`` / ``state_dict`` (``checkpoint_epoch=N.pt``)."""
    for key in ("network", "model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The network weights stored in ``path`` (CPU tensors), read without running any pickled code.

    Raises:
        InputError: missing / unreadable file, not a PyTorch file (corrupt, truncated, another
            format), a pickle of other code's objects, or a file that holds no tensors.
    """
    p = Path(path)
    check_entry(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise InputError(p, f"{_NOT_OURS}: it holds Python objects other than tensors (saved by other code), "
                                f"and loading them could run that code; {_WHICH}") from None
        raise InputError(p, f"{_NOT_OURS}: not a PyTorch file (corrupt, truncated or another format); {_WHICH}") from None
    except (RuntimeError, EOFError, OSError, ValueError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise InputError(p, f"{_NOT_OURS}: not a PyTorch file ({first}); {_WHICH}") from None
    state = state_dict_of(obj) if isinstance(obj, dict) else None
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        what = type(obj).__name__ if not isinstance(obj, dict) else f"a dict without weights (keys {list(obj)[:5]})"
        raise InputError(p, f"{_NOT_OURS}: it holds {what}, not network weights; {_WHICH}")
    return state


def load_weights(network: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load ``path``'s weights into ``network`` (strict), with a reason when they do not fit; a plain
    state dict (``model.pt``) or a resumable checkpoint (``checkpoint_epoch=N.pt``) alike.

    Raises:
        InputError: :func:`read_weights`'s reasons; no tensor names a layer of this network (another
            model's file); or the layers differ (trained with another overlay).
    """
    if Path(path).suffix == ".ts":
        raise InputError(path, "a TorchScript export, not the weights: evaluation and training need "
                               "OUTPUT_DIR/models/model.pt (or a checkpoint_epoch=N.pt) of a training run")
    state = read_weights(path)
    network = unwrap(network)  # a DistributedDataParallel wrapper's keys carry "module."
    ours = set(network.state_dict())
    if not ours & set(state):
        raise InputError(path, f"{_NOT_OURS}: none of its {len(state)} tensors names a layer of this network "
                               f"(first: {next(iter(state))!r}); {_WHICH}")
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else str(exc)
        raise InputError(path, f"weights do not fit the network of this config ({detail[:160]}); use the overlay the "
                               "model was trained with, e.g. --config_file "
                               "\"['bundles/plgg_mtl/configs/inference.json','configs/demo.json']\", and for a model "
                               "of several sequences --ckpt with its model.pt (inputs.json beside it names them)") from None
    return network


def load_network(network: torch.nn.Module, ckpt: str | Path | None, device: str | torch.device = "cpu",
                 backend: str = "auto") -> torch.nn.Module:
    """Load trained weights into the network built from the config (or a TorchScript ``.ts``).

    Args:
        network: the config's ``network_def``.
        ckpt: ``model.pt`` written by a training run (or a resumable ``checkpoint_epoch=N.pt``),
            a TorchScript file from ``monai.bundle ckpt_export`` (``.ts``) or an ONNX file from
            ``monai.bundle onnx_export`` (``.onnx``, run by ONNX Runtime); exports are used instead of ``network``.
        device: where the network runs.
        backend: ``auto`` (from the file's suffix), ``torch`` or ``onnx`` (which needs a ``.onnx`` file).

    Returns:
        The network on ``device`` in eval mode.

    Raises:
        InputError: no checkpoint given, or :func:`load_weights`'s reasons.
    """
    if ckpt in (None, ""):
        raise InputError(None, "no checkpoint: pass --ckpt PATH (OUTPUT_DIR/models/model.pt of a training run)")
    path = Path(ckpt)
    if not path.exists() and not path.is_symlink():
        raise InputError(path, "checkpoint not found (pass --ckpt PATH)")
    if backend not in ("auto", "torch", "onnx"):
        raise InputError(None, f"backend must be auto, torch or onnx, got {backend!r}")
    onnx = path.suffix == ".onnx"
    if backend != "auto" and onnx != (backend == "onnx"):
        raise InputError(path, f"backend {backend} needs {'an ONNX file (model.onnx from monai.bundle onnx_export)' if backend == 'onnx' else 'a PyTorch checkpoint (model.pt) or TorchScript file'}")
    if onnx:
        check_entry(path)
        from pipeline.models.onnx_backend import OnnxNetwork

        return OnnxNetwork(path, device).eval()
    if path.suffix == ".ts":
        check_entry(path)
        try:
            return torch.jit.load(str(path), map_location=device).eval()
        except Exception as exc:  # noqa: BLE001 - any loading problem is a bad file
            raise InputError(path, f"cannot be read as a TorchScript model: {str(exc).splitlines()[0][:200]}") from None
    return load_weights(network, path).to(device).eval()


def record_inputs(ckpt_dir: str | Path, sequences: list[str] | tuple[str, ...],
                  reference_sequence: str | int | None = None, coord_channels: int = 0,
                  metadata: str | Path | dict | None = None) -> Path:
    """Write ``ckpt_dir/inputs.json``: the sequences a model takes, in channel order, and the one the
    registration is estimated on (read back by :func:`trained_sequences`); with ``metadata`` (the
    bundle's ``metadata.json``) also ``ckpt_dir/metadata.json``, the bundle's metadata with the input
    described as this network takes it (:func:`describe_inputs`), for ``ckpt_export --meta_file``.

    Under several processes only rank 0 writes. The record sits beside the weights, as ``postprocessing.json`` does, rather than inside them: a
    ``model.pt`` stays a plain state dict that MONAI's loaders and ``torch.load(weights_only=True)`` read.
    """
    from pipeline.data.datalist import reference_index
    from pipeline.io.imageio import write_text_atomic
    from pipeline.runtime.distributed import is_main

    ref = reference_index(sequences, reference_sequence)
    folder = Path(ckpt_dir)
    if not is_main():  # several processes: rank 0 writes
        return folder / INPUTS_FILE
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / INPUTS_FILE
    write_text_atomic(path, json.dumps({"sequences": list(sequences), "reference_sequence": list(sequences)[ref],
                                        "coord_channels": int(coord_channels)}, indent=1))
    if metadata is not None:
        base = metadata if isinstance(metadata, dict) else json.loads(Path(metadata).read_text(encoding="utf-8"))
        write_text_atomic(folder / "metadata.json", json.dumps(describe_inputs(base, sequences, coord_channels),
                                                               indent=4))
    return path


def describe_inputs(metadata: dict, sequences: list[str] | tuple[str, ...], coord_channels: int) -> dict:
    """``metadata`` (a bundle ``metadata.json``) with ``network_data_format.inputs.image`` describing
    a network of these sequences and coordinate channels: ``num_channels`` and ``channel_def``."""
    out = json.loads(json.dumps(metadata))
    image = out.setdefault("network_data_format", {}).setdefault("inputs", {}).setdefault("image", {})
    names = [str(s) for s in sequences]
    channel_def = {str(k): f"{'FLAIR' if n.lower() == 'flair' else n} (z-scored inside the brain)"
                   for k, n in enumerate(names)}
    axes = ("first", "second", "third")
    for k in range(int(coord_channels)):
        channel_def[str(len(names) + k)] = (f"atlas coordinate, {axes[k] if k < 3 else str(k + 1)} axis "
                                            "(-0.5 .. 0.5 over the atlas grid)")
    image["num_channels"] = len(names) + int(coord_channels)
    image["channel_def"] = channel_def
    image["sequences"] = names
    return out


def _embedded_sequences(path: Path) -> list[str] | None:
    """The sequences named in the metadata an export carries (TorchScript ``extra_files`` or ONNX
    ``metadata_props``), or ``None``."""
    try:
        if path.suffix == ".ts":
            extra = {"metadata.json": ""}
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            text = extra["metadata.json"]
        elif path.suffix == ".onnx":
            import onnx

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            text = props.get("metadata.json", "")
        else:
            return None
        names = json.loads(text)["network_data_format"]["inputs"]["image"]["sequences"] if text else None
    except Exception:  # noqa: BLE001 - an export without the record: the config decides
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def trained_sequences(ckpt: str | Path | None, sequences: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The sequences the model in ``ckpt`` takes: those an export's metadata names, else those recorded
    beside it (``inputs.json``), checked against ``sequences`` when the config names them too; a model
    without the record (trained before it existed) takes ``sequences`` or one image.

    Raises:
        InputError: the config's ``sequences`` differ from those the model was trained on, or the
            record is unreadable.
    """
    from pipeline.data.datalist import SINGLE_SEQUENCE

    record = Path(ckpt).parent / INPUTS_FILE if ckpt not in (None, "") else None
    embedded = _embedded_sequences(Path(ckpt)) if record is not None and Path(ckpt).is_file() else None
    if embedded is not None:  # an export says what it takes
        record, recorded = Path(ckpt), embedded
    elif record is None or not record.is_file():
        return list(sequences) if sequences else [SINGLE_SEQUENCE]
    else:
        try:
            recorded = json.loads(record.read_text(encoding="utf-8"))["sequences"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(record, f"cannot be read as the model's input record ({type(exc).__name__}); "
                                     "write it again or remove it and set 'sequences'") from None
    if not isinstance(recorded, list) or not recorded or not all(isinstance(n, str) for n in recorded):
        raise InputError(record, f"'sequences' must be a list of names, got {recorded!r}")
    if sequences and len(sequences) == len(recorded) == 1:
        return list(sequences)  # one image: the config may name it (a FLAIR-only datalist names nothing)
    if sequences and [s.lower() for s in sequences] != [s.lower() for s in recorded]:
        raise InputError(record, f"the model was trained on the sequences {recorded}, in this order, but the config "
                                 f"asks for {list(sequences)}: drop 'sequences' from the overlay or give that list")
    return list(recorded)
