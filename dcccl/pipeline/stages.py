"""The stages a plan calls, each registered by the LightningModule class that runs it.

A stage module declares its stage where it is defined::

    @register_stage("head", required=lambda settings: settings.finetune_head, arguments=HeadArguments)
    class HeadFinetuneModule(StageModule): ...

and so says, in one place, the stage's name, the class every config of the stage must run (or a subclass: what the
privacy boundary checks), whether a pipeline config must name its config file, and the typed arguments the plan gives
it. Importing :mod:`lightning_modules` registers every stage the pipeline and the compared methods call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, Union

from dcccl.backbones.spec import BackboneSpec
from dcccl.registry import Registry

if TYPE_CHECKING:
    from dcccl.pipeline.settings import PipelineSettings


@dataclass(frozen=True)
class StageArguments:
    """The init arguments a plan gives a stage module: the base of each stage's own (one frozen dataclass each).

    Every field is handed over as it is, ``None`` included (the stage's config may not set it otherwise), except the
    fields named in :attr:`OPTIONAL`: those are handed over only when set, and the stage's config decides otherwise.
    """

    OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    def model_args(self) -> dict[str, Any]:
        """The arguments as the stage's parser resolves them: paths as strings, specs as dicts."""
        return {field.name: _plain(getattr(self, field.name)) for field in fields(self)
                if not (field.name in self.OPTIONAL and getattr(self, field.name) in (None, False))}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The module arguments these arguments set."""
        return tuple(field.name for field in fields(cls))


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, BackboneSpec) or hasattr(value, "to_dict"):
        return value.to_dict()
    return value


ModuleClass = TypeVar("ModuleClass", bound=type)
Required = Union[bool, Callable[["PipelineSettings"], bool]]


@dataclass(frozen=True)
class Stage:
    """One stage of a plan.

    Args:
        name: The stage's name (``stages.<name>`` in a pipeline config).
        module: The class every config of the stage must run, or a subclass of it.
        required: Whether a pipeline config must name the stage's config (or a predicate on the settings).
        arguments: The typed arguments the plan gives the module.
    """

    name: str
    module: type
    required: Required
    arguments: type[StageArguments]

    def is_required(self, settings: PipelineSettings) -> bool:
        """Whether a run with ``settings`` needs the stage's config."""
        return self.required(settings) if callable(self.required) else bool(self.required)


STAGES: Registry[Stage] = Registry("stage")


def register_stage(name: str, *, arguments: type[StageArguments], required: Required = False
                   ) -> Callable[[ModuleClass], ModuleClass]:
    """Register the decorated LightningModule class as the module of stage ``name``.

    Raises:
        TypeError: ``arguments`` names a field the module's ``__init__`` does not take (a plan could not hand it over).
    """
    def register(module: ModuleClass) -> ModuleClass:
        parameters = inspect.signature(module.__init__).parameters  # type: ignore[misc]
        unknown = [argument for argument in arguments.names() if argument not in parameters]
        if unknown:
            raise TypeError(f"stage {name!r}: {module.__qualname__}.__init__ takes no {', '.join(unknown)}, which its "
                            f"arguments {arguments.__qualname__} hand over")
        STAGES.add(name, Stage(name, module, required, arguments))
        return module

    return register


def required_stages(settings: PipelineSettings) -> list[str]:
    """The stages whose configs a run with ``settings`` needs."""
    return [stage.name for stage in STAGES.values() if stage.is_required(settings)]
