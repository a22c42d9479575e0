"""Name -> network builder: registered custom backbones, ``package.module:function`` paths, then timm."""

from __future__ import annotations

import difflib
import importlib
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from dcccl.errors import ConfigError, DCCCLError, MissingFileError
from dcccl.registry import Registry

BackboneBuilder = Callable[..., nn.Module]
_BuilderT = TypeVar("_BuilderT", bound=BackboneBuilder)

BACKBONES: Registry[BackboneBuilder] = Registry("backbone")


class BackboneNotFoundError(DCCCLError, KeyError):
    """Raised when a backbone name is neither registered, importable nor a timm model."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def register_backbone(fn: _BuilderT | None = None, *, key: str | None = None) -> Any:
    """Register a builder ``fn(num_classes, in_chans, **kwargs) -> nn.Module`` under ``key`` (default: its name).

    Usable bare (``@register_backbone``) or with a key (``@register_backbone(key="my_net")``).
    A registered name shadows a timm model of the same name.
    """

    def _register(builder: _BuilderT) -> _BuilderT:
        name = key or builder.__name__
        BACKBONES.add(name, builder)
        return builder

    return _register(fn) if fn is not None else _register


def rebuildable_name(name: str) -> str:
    """A name that rebuilds the backbone in a fresh process.

    A key registered by a module outside dcccl is only known once that module is imported; as
    ``module:key`` the module is imported on lookup. Other names are returned unchanged.
    """
    builder = BACKBONES.get(name)
    if builder is None or builder.__module__.split(".")[0] == "dcccl":
        return name
    return f"{builder.__module__}:{name}"


def list_backbones() -> list[str]:
    """Names of the registered custom backbones (any timm model name is accepted as well)."""
    return BACKBONES.names()


def _import_builder(path: str) -> BackboneBuilder:
    """``package.module:name``: a callable of that module, or a key the module registers when imported."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BackboneNotFoundError(f"cannot import backbone builder {path!r}: {err}") from err
    builder = getattr(module, attr, None) or BACKBONES.get(attr)
    if builder is None:
        raise BackboneNotFoundError(
            f"cannot import backbone builder {path!r}: {module_name} has no {attr!r} and registers no such backbone"
        )
    if not callable(builder):
        raise BackboneNotFoundError(f"backbone builder {path!r} is not callable")
    return builder


def _not_found(name: str) -> BackboneNotFoundError:
    import timm  # imported here: a command that builds no network does not wait for it

    candidates = list_backbones() + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return BackboneNotFoundError(
        f"unknown backbone {name!r}: not registered ({', '.join(list_backbones())}), "
        f"not a 'package.module:function' path and not a timm model.{hint}"
    )


def _classifier_keys(network: nn.Module) -> set[str]:
    get_classifier = getattr(network, "get_classifier", None)
    if get_classifier is None:
        return set()
    classifier = get_classifier()
    prefixes = [name for name, module in network.named_modules() if module is classifier]
    return {key for key in network.state_dict() if any(key.startswith(prefix + ".") for prefix in prefixes)}


def _strip_module_prefix(state: dict[str, Any], own_keys: set[str]) -> dict[str, Any]:
    """Keys of a Lightning checkpoint carry the attribute path of the network (``cloud_submodel.conv.weight``):
    drop the prefix under which most keys match the network's own."""
    if sum(key in own_keys for key in state) * 2 > len(state):
        return state
    best, best_hits = "", 0
    for prefix in {key[: i + 1] for key in state for i, char in enumerate(key) if char == "."}:
        hits = sum(key.startswith(prefix) and key[len(prefix):] in own_keys for key in state)
        if hits > best_hits:
            best, best_hits = prefix, hits
    if not best:
        return state
    return {key[len(best):]: value for key, value in state.items() if key.startswith(best)}


class WeightsFileError(DCCCLError, ValueError):
    """A ``checkpoint_path`` names a file that holds no weights torch can read."""


def torch_load_problem(path: Path, err: Exception) -> str:
    """Why ``torch.load`` failed on ``path``, in a few words (torch's own messages run to paragraphs)."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):  # neither torch's zip nor its legacy pickle
        return "not a file written by torch.save"
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return first if len(first) <= 160 else first[:157] + "..."


def read_state_dict(checkpoint_path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The state dict a local weights file holds: a plain state dict (e.g. a timm checkpoint), one wrapped under
    ``state_dict`` or ``model``, a Lightning checkpoint's (keys still carry the module's attribute prefix), or a
    ``.safetensors`` file (what the Hugging Face hub serves timm's weights as).

    Args:
        checkpoint_path: The file.
        mmap: Map the tensors instead of reading them (a cheap check; only for files in torch's zip format).

    Raises:
        FileNotFoundError: There is no such file.
        WeightsFileError: torch cannot read the file, or it holds no state dict.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise MissingFileError(f"pretrained weights file not found: {path}; fix checkpoint_path")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsFileError(f"{path} is not a safetensors file that can be read ({err}): point "
                                   "checkpoint_path at the weights file itself") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:  # torch raises several types for foreign or corrupt files
        raise WeightsFileError(
            f"{path} is not a weights file torch can read ({torch_load_problem(path, err)}): point checkpoint_path at "
            "a state dict, a timm checkpoint or a Lightning checkpoint"
        ) from err
    for wrapper_key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper_key), dict):
            state = state[wrapper_key]
    if not isinstance(state, dict):
        raise WeightsFileError(f"{path} does not hold a state dict: point checkpoint_path at a state dict, a timm "
                               "checkpoint or a Lightning checkpoint")
    return state


class MissingPretrainedWeightsError(MissingFileError):
    """``pretrained: true`` names a timm model whose weights are not on this machine (nothing is ever downloaded)."""


# The files timm's weights are kept under on the Hugging Face hub, in the order timm tries them.
_HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache this process reads (``HF_HUB_CACHE``, else ``HF_HOME/hub``), read at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def cached_pretrained_file(name: str) -> Path | None:
    """The file of timm's pretrained weights for ``name`` in the local hub cache, or ``None`` (never downloads)."""
    import timm  # imported here: a command that builds no network does not wait for it
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    config = get_pretrained_cfg(name, allow_unregistered=False) if timm.is_model(name) else None
    repo = getattr(config, "hf_hub_id", None)
    if not repo:
        return None
    filenames = (config.hf_hub_filename,) if config.hf_hub_filename else _HUB_FILENAMES  # type: ignore[union-attr]
    for filename in filenames:
        found = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir())
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def pretrained_file(name: str) -> Path:
    """Where timm's pretrained weights for ``name`` are on this machine; refused, saying where to put them."""
    import timm  # imported here: a command that builds no network does not wait for it

    if not timm.is_model(name):
        raise ConfigError(f"pretrained: true needs a timm model name, got {name!r}: give checkpoint_path a weights "
                          "file instead")
    found = cached_pretrained_file(name)
    if found is None:
        from timm.models import get_pretrained_cfg

        repo = getattr(get_pretrained_cfg(name), "hf_hub_id", None) or f"timm/{name}"
        raise MissingPretrainedWeightsError(
            f"pretrained weights of {name} are not in the Hugging Face cache {hub_cache_dir()} (nothing is "
            f"downloaded): on a machine with network run `huggingface-cli download {repo}` and copy its cache here "
            "(set HF_HOME or HF_HUB_CACHE to it, and HF_HUB_OFFLINE=1), or download the weights file and set the "
            "backbone's checkpoint_path to it")
    return found


def check_backbone(name: str, checkpoint_path: str | Path | None = None, pretrained: bool = False) -> None:
    """Check, without building anything, that ``name`` names a backbone and its weights are on this machine.

    Raises:
        BackboneNotFoundError: ``name`` is neither registered, importable nor a timm model (close names listed).
        FileNotFoundError: ``checkpoint_path`` does not exist.
        WeightsFileError: ``checkpoint_path`` holds no weights torch can read.
        MissingPretrainedWeightsError: ``pretrained`` without ``checkpoint_path``, and timm's weights are not in the
            local Hugging Face cache.
    """
    import timm  # imported here: a command that builds no network does not wait for it

    if name not in BACKBONES:
        if ":" in name:
            _import_builder(name)
        elif not timm.is_model(name):
            raise _not_found(name)
    if checkpoint_path is not None:
        read_state_dict(checkpoint_path, mmap=True)
    elif pretrained:
        pretrained_file(name)


def load_local_weights(network: nn.Module, checkpoint_path: str | Path) -> None:
    """Load weights from a local file into ``network``; a classifier of another size is left as initialised.

    Accepts a plain state dict (e.g. a timm checkpoint), a dict holding one under ``state_dict`` or ``model``,
    and a Lightning checkpoint (the module's attribute prefix, e.g. ``cloud_submodel.``, is dropped).
    """
    path = Path(checkpoint_path)
    state = read_state_dict(path)
    own = network.state_dict()
    state = _strip_module_prefix(state, set(own))
    head_keys = _classifier_keys(network)
    for key in [k for k in state if k in head_keys and state[k].shape != own[k].shape]:
        del state[key]
    misfits = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
               for k in state if k in own and state[k].shape != own[k].shape]
    if misfits:
        raise WeightsFileError(f"weights in {path} do not fit the network: shape mismatch in {misfits[:5]}")
    missing, unexpected = network.load_state_dict(state, strict=False)
    missing = [key for key in missing if key not in head_keys]
    if missing or unexpected:
        raise WeightsFileError(
            f"weights in {path} do not fit the network: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def build_backbone(
    name: str,
    num_classes: int,
    in_chans: int,
    checkpoint_path: str | Path | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build the backbone called ``name`` with ``num_classes`` logits and ``in_chans`` input channels.

    Args:
        name: A registered name, a ``package.module:function`` path, or a timm model name.
        num_classes: Number of output logits.
        in_chans: Number of input channels.
        checkpoint_path: Optional local weights file. Nothing is ever downloaded.
        pretrained: Without ``checkpoint_path``: timm's pretrained weights for ``name`` from the local Hugging Face
            cache, loaded by timm (its key filters, a classifier of another size re-initialised).
        **kwargs: Passed to the builder (for timm: to ``timm.create_model``).
    """
    import timm  # imported here: a command that builds no network does not wait for it

    if pretrained and checkpoint_path is None:
        weights = pretrained_file(name)
        # timm's own loader, pointed at the local file: nothing reaches for the hub.
        return timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans,
                                 pretrained_cfg_overlay={"file": str(weights), "source": ""}, **kwargs)
    if name in BACKBONES:
        network = BACKBONES[name](num_classes=num_classes, in_chans=in_chans, **kwargs)
    elif ":" in name:
        network = _import_builder(name)(num_classes=num_classes, in_chans=in_chans, **kwargs)
    elif timm.is_model(name):
        # Never pretrained=True: that would reach for a hub. Local weights are loaded below, the same way
        # as for registered backbones (a classifier of the same size is kept, another size is re-initialised).
        network = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    else:
        raise _not_found(name)
    if checkpoint_path is not None:
        load_local_weights(network, checkpoint_path)
    return network
