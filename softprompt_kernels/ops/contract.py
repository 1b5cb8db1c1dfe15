"""An op's argument list, written once, and everything derived from it.

An :class:`OpContract` lists an op's arguments in order (:class:`Arg`: name, type, default, what it is). From that
one list come:

- the public function users call (:meth:`OpContract.public_function`: a real Python function with that
  signature and a docstring built from the arguments' descriptions);
- the validated-arguments record every backend receives (:meth:`OpContract.inputs_class`);
- the schemas of the compiled ops that implement the op (:meth:`OpContract.schema`) and the Python signatures
  ``torch.library.custom_op`` / ``triton_op`` infer theirs from (:meth:`OpContract.signature`);
- the positional order handed to those ops (:meth:`OpContract.positional`) and the reading back, by name, of
  what the dispatcher hands to fake kernels and autograd (:meth:`OpContract.named`).

The C++ kernels read their arguments by name from the schema (csrc/op_args.h), so no other file holds the order.
"""
from __future__ import annotations

import dataclasses
import inspect
import textwrap
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

REQUIRED = object()  # an argument without a default

# schema type -> Python annotation (what custom_op's schema inference reads)
ANNOTATIONS = {
    "Tensor": torch.Tensor, "Tensor?": Optional[torch.Tensor], "bool": bool, "float": float,
    "float?": Optional[float], "int": int, "int?": Optional[int], "SymInt": int, "str": str,
}


@dataclasses.dataclass(frozen=True)
class Arg:
    """One argument of an op.

    ``type`` is the schema type the compiled ops take; ``public_type`` the one callers may pass when it differs
    (``scale``: None means the default, resolved by validation). ``grad``: ``"kernel"`` when the backward op
    returns its gradient, ``"formula"`` when autograd computes it from the forward's outputs. ``kernel=False``:
    a call option the compiled ops never see (the reference backend serves it; the fused backends refuse it).
    """

    name: str
    type: str
    doc: str
    default: Any = REQUIRED
    grad: Optional[str] = None
    kernel: bool = True
    public_type: Optional[str] = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def schema_entry(self) -> str:
        return f"{self.type} {self.name}"


class OpContract:
    """The arguments of one op, in order; ``kernel_args`` are those handed to the compiled ops."""

    def __init__(self, name: str, args: Sequence[Arg], outputs: Sequence[str]):
        self.name = name
        self.args: Tuple[Arg, ...] = tuple(args)
        self.outputs = tuple(outputs)
        self.kernel_args: Tuple[Arg, ...] = tuple(a for a in self.args if a.kernel)
        self.by_name: Dict[str, Arg] = {a.name: a for a in self.args}
        if len(self.by_name) != len(self.args):
            raise ValueError(f"{name}: argument names must be unique")

    # --- the compiled ops

    def schema(self, leading: Sequence[Arg] = (), trailing: Sequence[Arg] = (),
               returns: Optional[Sequence[str]] = None) -> str:
        """``(leading..., kernel args..., trailing...) -> (Tensor out, ...)``: a compiled op's schema, without
        defaults (the package passes every argument, ``positional``; so does autograd's bookkeeping)."""
        entries = [a.schema_entry() for a in (*leading, *self.kernel_args, *trailing)]
        names = self.outputs if returns is None else tuple(returns)
        return f"({', '.join(entries)}) -> ({', '.join(f'Tensor {n}' for n in names)})"

    def signature(self, leading: Sequence[Arg] = (), trailing: Sequence[Arg] = (),
                  returns=None) -> inspect.Signature:
        """The Python signature of a compiled op's implementation (custom_op / triton_op infer schemas from it;
        without defaults: the package passes every argument, ``positional``)."""
        parameters = [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        annotation=ANNOTATIONS[a.type])
                      for a in (*leading, *self.kernel_args, *trailing)]
        return inspect.Signature(parameters, return_annotation=returns)

    def positional(self, values: Mapping[str, Any], leading: Sequence[Arg] = (),
                   trailing: Sequence[Arg] = ()) -> Tuple[Any, ...]:
        """The values in the compiled ops' order (every argument passed: none left to the schema's defaults)."""
        return tuple(_value(values, a) for a in (*leading, *self.kernel_args, *trailing))

    def named(self, args: Sequence[Any], kwargs: Optional[Mapping[str, Any]] = None, leading: Sequence[Arg] = (),
              trailing: Sequence[Arg] = ()) -> Dict[str, Any]:
        """What the dispatcher hands a fake kernel or autograd (positionally, trailing defaults possibly left
        out), as {name: value}."""
        order = (*leading, *self.kernel_args, *trailing)
        if len(args) > len(order):
            raise TypeError(f"{self.name}: {len(args)} arguments given, the schema has {len(order)}")
        named = dict(zip((a.name for a in order), args))
        named.update(kwargs or {})
        return {a.name: _value(named, a) for a in order}

    # --- the public side

    def complete(self, arguments: Mapping[str, Any]) -> Dict[str, Any]:
        """Every argument by name: those left out get their defaults; unknown or missing ones raise TypeError."""
        unknown = sorted(set(arguments) - set(self.by_name))
        if unknown:
            raise TypeError(f"{self.name}() got unexpected arguments {unknown}; its arguments are {list(self.by_name)}")
        return {a.name: _value(arguments, a) for a in self.args}

    def inputs_class(self, name: str, base: type = object) -> type:
        """A frozen dataclass with one field per argument (the validated call every backend receives), whose
        ``kernel_arguments()`` are the compiled ops' positional arguments."""
        fields = [(a.name, ANNOTATIONS[a.type], dataclasses.field(default=None if a.required else a.default))
                  for a in self.args]

        names = tuple(a.name for a in self.kernel_args)  # plain strings: torch.compile traces through this

        def kernel_arguments(inputs) -> tuple:
            return tuple(getattr(inputs, name) for name in names)

        return dataclasses.make_dataclass(name, fields, bases=(base,), frozen=True,
                                          namespace={"kernel_arguments": kernel_arguments})

    def public_function(self, implementation: Callable[..., Any], options: Sequence[Arg], doc: str,
                        module: str) -> Callable[..., Any]:
        """``name(required args, *, optional args and options)``: a plain function (generated, as dataclasses
        generate ``__init__``) that calls ``implementation`` with every argument by keyword."""
        everything = (*self.args, *options)
        required = [a.name for a in everything if a.required]
        optional = [a for a in everything if not a.required]
        defaults = {f"_default_{a.name}": a.default for a in optional}
        parameters = ", ".join([*required, "*", *(f"{a.name}=_default_{a.name}" for a in optional)])
        call = ", ".join(f"{a.name}={a.name}" for a in everything)
        source = f"def {self.name}({parameters}):\n    return _implementation({call})\n"
        namespace: Dict[str, Any] = {"_implementation": implementation, **defaults}
        exec(compile(source, f"<{module}.{self.name}: generated from its contract>", "exec"), namespace)
        function = namespace[self.name]
        function.__module__ = module
        function.__qualname__ = self.name
        function.__doc__ = doc + "\n\n    Args:\n" + "\n".join(_describe(a) for a in everything)
        function.__annotations__ = {a.name: ANNOTATIONS[a.public_type or a.type] for a in everything}
        return function


def size_of(tensor: str, dim: int, doc: str) -> property:
    """A property of a validated record: the size of one dimension of one of its tensors."""
    return property(lambda inputs: getattr(inputs, tensor).shape[dim], doc=doc)


def _value(values: Mapping[str, Any], arg: Arg):
    if arg.name in values:
        return values[arg.name]
    if arg.required:
        raise TypeError(f"missing required argument {arg.name!r}")
    return arg.default


def _describe(arg: Arg) -> str:
    return textwrap.fill(f"{arg.name}: {arg.doc}", width=110, initial_indent=" " * 8, subsequent_indent=" " * 12)
