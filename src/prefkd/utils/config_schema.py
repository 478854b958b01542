"""Typed schemas of config nodes, checked before anything loads.

A **schema** is a dataclass whose fields are the keys a node accepts. The field's type says which values (the
vocabulary of :mod:`prefkd.utils.config_types`, another schema for a nested node, a :class:`Target` for a node Hydra
instantiates, a :class:`OneOf` for a node whose keys depend on one of them); its :func:`key` says what the key is for,
its range and whether it may be absent. The dataclasses carry no defaults: the YAML files choose the values, a schema
says what is accepted. A schema may define ``cross_check(node, path) -> list[str]``: problems of key combinations,
run once its own keys are well-typed.

A :class:`Target` node (``_target_: module.factory``) is checked against the factory's signature
(``inspect.signature`` and ``typing.get_type_hints``): every key must be a parameter (unless it takes ``**kwargs``)
or one of the node's ``extra`` keys (read by prefkd itself, e.g. ``teacher.shard``), every value of the type its
parameter declares, and every parameter without a default must be given.

:func:`check` returns every problem as one line, e.g. ``trainer.max_steps='abc': expects an integer ≥ 1 or null`` or
``trainer.bach_size: unknown key; did you mean trainer.batch_size? (accepted: batch_size, ...)``;
:func:`raise_problems` raises them together as one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from prefkd.utils.config_types import NO_LIMITS, Limits, accepts, arms, describe, from_hint

HYDRA_KEYS = ("_target_", "_recursive_", "_convert_", "_partial_", "_args_")


class ConfigError(ValueError):
    """One or more config keys are wrong; the message names each key, what it holds and what it accepts."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} problems in the configuration:\n"
                             + "\n".join(f"  - {p}" for p in self.problems))


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


def key(doc: str, *, optional: bool = False, **limits) -> Any:
    """A schema field: ``doc`` says what the key is for; ``optional``: the key may be absent; ``limits``: the
    :class:`~prefkd.utils.config_types.Limits` of its value (``ge=1``, ``gt=0``, ``length=2``, ``pattern=...``)."""
    return field(metadata={"doc": doc, "optional": optional, "limits": Limits(**limits)})


@dataclass(frozen=True)
class Target:
    """A node Hydra instantiates (``_target_``), checked against its factory's signature. ``extra``: a schema of the
    keys prefkd reads itself and takes out before instantiating; ``empty``: an empty node (``teacher=none``) is
    allowed; ``nested``: parameters whose mapping value is the keyword arguments of another callable
    (``student.lora`` -> :func:`prefkd.models.loading.apply_lora`), checked against that callable; ``nullable``:
    parameters that may be null whatever their type, because null means the node is not instantiated at all
    (``reward_model.path: null`` = no reward model)."""

    extra: type | None = None
    empty: bool = False
    nested: Mapping[str, Callable] = field(default_factory=dict)
    nullable: tuple[str, ...] = ()


@dataclass(frozen=True)
class OneOf:
    """A node whose keys depend on the value of one of them (``by``): ``options`` maps each value to its schema
    (``eval.protocol`` -> the instruct, nll or preference keys)."""

    by: str
    options: Mapping[str, type]


def show(value) -> str:
    """A value as it appears in a problem line (``'abc'``, ``0``, ``[1, 2]``)."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def unknown_key(path: str, name: str, accepted: list[str]) -> str:
    """``path.name: unknown key; did you mean path.close? (accepted: closest first, then the rest)``."""
    close = difflib.get_close_matches(name, accepted, n=3, cutoff=0.6)
    ordered = close + [a for a in accepted if a not in close]
    listing = ", ".join(ordered) if ordered else "none"
    hint = f"; did you mean {join(path, close[0])}?" if close else ""
    return f"{join(path, name)}: unknown key{hint} (accepted: {listing})"


def join(path: str, name) -> str:
    return f"{path}.{name}" if path else str(name)


def hydra_runtime(node: DictConfig, name: str) -> bool:
    """``node[name]`` is an interpolation of Hydra's runtime (``${hydra:...}``), which resolves only under
    ``@hydra.main``: not checked (the config is often composed without it, in tests and scripts)."""
    return OmegaConf.is_interpolation(node, name) and "${hydra:" in str(node._get_node(name)._value())


def read(node, name: str, path: str, problems: list[str]) -> tuple[bool, Any]:
    """(present, value) of ``node[name]``, resolving interpolations; a ``???`` value is absent here (the entry
    points report those separately), as is a value of Hydra's runtime; one that cannot be resolved is a problem."""
    if isinstance(node, DictConfig) and (OmegaConf.is_missing(node, name) or hydra_runtime(node, name)):
        return False, None
    try:
        return True, node[name]
    except Exception as e:  # an interpolation that does not resolve
        problems.append(f"{join(path, name)}: cannot be resolved ({type(e).__name__}: {str(e).splitlines()[0]})")
        return False, None


# ------------------------------------------------------------------------------------------------ walking nodes
def check(node, schema, path: str = "") -> list[str]:
    """Every problem of ``node`` against ``schema`` (a dataclass, :class:`Target` or :class:`OneOf`); ``path`` is
    the node's key in the whole config (``trainer``)."""
    if isinstance(schema, Target):
        return check_target(node, schema, path)
    if isinstance(schema, OneOf):
        return check_one_of(node, schema, path)
    return check_fields(node, schema, path)


def is_node(schema) -> bool:
    return isinstance(schema, (Target, OneOf)) or (isinstance(schema, type) and dataclasses.is_dataclass(schema))


def check_value(value, annotation, limits: Limits, path: str) -> list[str]:
    """A value against a field's annotation: a nested schema is walked, anything else tested."""
    nodes = [arm for arm in arms(annotation) if is_node(arm)]
    if nodes and isinstance(value, (dict, DictConfig)):
        return check(value, nodes[0], path)
    plain = [arm for arm in arms(annotation) if not is_node(arm)]
    if plain and accepts(typing.Union[tuple(plain)], value, limits):  # noqa: UP007 (built at run time)
        return []
    words = [describe(typing.Union[tuple(plain)], limits)] if plain else []  # noqa: UP007
    words += ["a mapping of its keys" for _ in nodes]
    return [f"{path}={show(value)}: expects {' or '.join(words)}"]


def check_fields(node, schema: type, path: str) -> list[str]:
    """A node against a dataclass schema: unknown keys, missing keys, values, then the schema's ``cross_check``."""
    if not isinstance(node, (dict, DictConfig)):
        return [f"{path}={show(node)}: expects a mapping of its keys ({', '.join(field_names(schema))})"]
    fields = {f.name: f for f in dataclasses.fields(schema)}
    types = annotations(schema)
    problems = [unknown_key(path, name, list(fields)) for name in node if name not in fields]
    before = len(problems)
    given = set(node.keys())  # with the ??? ones, which `in` leaves out
    for name, f in fields.items():
        if name not in given:
            if not f.metadata.get("optional"):
                problems.append(f"{join(path, name)}: missing; expects {describe_field(f, types[name])} "
                                f"({f.metadata['doc']})")
            continue
        present, value = read(node, name, path, problems)
        if present:
            problems += check_value(value, types[name], f.metadata.get("limits", NO_LIMITS), join(path, name))
    if len(problems) == before and hasattr(schema, "cross_check"):
        problems += schema.cross_check(node, path)
    return problems


def field_names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def annotations(schema: type) -> dict[str, Any]:
    """Each field's annotation as an object (resolving those a ``from __future__ import annotations`` made
    strings)."""
    fields = dataclasses.fields(schema)
    if any(isinstance(f.type, str) for f in fields):
        return typing.get_type_hints(schema)
    return {f.name: f.type for f in fields}


def describe_field(f: dataclasses.Field, annotation) -> str:
    plain = [arm for arm in arms(annotation) if not is_node(arm)]
    return describe(typing.Union[tuple(plain)], f.metadata.get("limits", NO_LIMITS)) if plain else "a mapping"  # noqa: UP007


def check_one_of(node, schema: OneOf, path: str) -> list[str]:
    if not isinstance(node, (dict, DictConfig)):
        return [f"{path}={show(node)}: expects a mapping of its keys"]
    choice = node.get(schema.by)
    if choice not in schema.options:
        return [f"{join(path, schema.by)}={show(choice)}: expects one of {', '.join(schema.options)}"]
    return check_fields(node, schema.options[choice], path)


# ------------------------------------------------------------------------------------------------ signatures
@dataclass(frozen=True)
class Signature:
    """What a callable takes as keyword arguments: ``params`` name -> (annotation, required), and whether it takes
    ``**kwargs`` (then any key is accepted)."""

    params: dict[str, tuple[Any, bool]]
    any_key: bool


def signature_of(target: Callable, skip: int = 0) -> Signature:
    """The keyword parameters of ``target`` (a function or class; its first ``skip`` positional parameters left out)
    with their hints in :mod:`prefkd.utils.config_types`'s vocabulary (unchecked where a hint cannot be read)."""
    function = inspect.unwrap(target.__init__ if isinstance(target, type) else target)
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # a hint that does not evaluate: leave the values unchecked
        hints = {}
    sig = inspect.signature(target)
    params, any_key = {}, False
    for i, p in enumerate(sig.parameters.values()):
        if p.kind is p.VAR_KEYWORD:
            any_key = True
        elif p.kind is not p.VAR_POSITIONAL and i >= skip:
            params[p.name] = (from_hint(hints.get(p.name, Any)), p.default is p.empty)
    return Signature(params, any_key)


def locate(dotted: str):
    from hydra.utils import get_object

    return get_object(dotted)


def check_target(node, schema: Target, path: str) -> list[str]:
    """A ``_target_`` node against its factory's signature and ``schema.extra``."""
    if node is None or (isinstance(node, (dict, DictConfig)) and not node and schema.empty):
        return [] if schema.empty else [f"{path}: missing; expects a node with _target_ (the factory Hydra calls)"]
    if not isinstance(node, (dict, DictConfig)):
        return [f"{path}={show(node)}: expects a node with _target_ (the factory Hydra calls)"]
    if "_target_" not in node:
        return [f"{path}: no _target_ (the factory Hydra calls, e.g. prefkd.models.loading.load_pretrained)"]
    target = node["_target_"]
    try:
        factory = locate(target)
    except Exception as e:
        return [f"{path}._target_={target!r}: cannot be imported ({type(e).__name__}: {str(e).splitlines()[0]})"]
    extra = field_names(schema.extra) if schema.extra else []
    problems = check_params(node, factory, path, ignore={*extra, *HYDRA_KEYS}, nested=schema.nested, owner=target,
                            nullable=schema.nullable)
    if extra:  # every extra key may be absent (the schema's fields say so)
        problems += check_fields({k: node[k] for k in node if k in extra}, schema.extra, path)
    return problems


def check_params(node, target: Callable, path: str, *, skip: int = 0, ignore: set[str] = frozenset(),
                 nested: Mapping[str, Callable] | None = None, owner: str | None = None,
                 nullable: tuple[str, ...] = ()) -> list[str]:
    """The keys of ``node`` as keyword arguments of ``target``: unknown keys, values of the wrong type, parameters
    without default left out. ``nested``: parameters whose value is itself checked against another callable."""
    if not isinstance(node, (dict, DictConfig)):
        return [f"{path}={show(node)}: expects a mapping of its keys"]
    sig = signature_of(target, skip)
    name = owner or getattr(target, "__qualname__", str(target))
    problems = []
    for k in node:
        if k in ignore:
            continue
        if k not in sig.params:
            if not sig.any_key:
                problems.append(unknown_key(path, k, [*sig.params, *sorted(ignore - set(HYDRA_KEYS))]))
            continue
        present, value = read(node, k, path, problems)
        if not present or (value is None and k in nullable):
            continue
        if nested and k in nested and isinstance(value, (dict, DictConfig)):
            problems += check_params(value, nested[k], join(path, k), skip=1)
        elif isinstance(value, (dict, DictConfig)) and "_target_" in value:
            problems += check_target(value, Target(), join(path, k))
        else:
            annotation, _ = sig.params[k]
            if not accepts(annotation, value):
                problems.append(f"{join(path, k)}={show(value)}: expects {describe(annotation)} (the parameter "
                                f"{k} of {name})")
    given = set(node.keys())
    partial = node.get("_partial_") is True  # Hydra's functools.partial: the rest is passed later
    for k, (annotation, required) in sig.params.items():
        if required and k not in given and not partial:
            problems.append(f"{join(path, k)}: missing; {name} needs it ({describe(annotation)})")
    return problems
