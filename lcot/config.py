"""One dataclass per command: its fields are the command's flags, with their help, defaults and choices.

`parser(Config)` builds the argparse parser (every default shown in --help), `parse(Config, argv)` gives the
config, and Python callers (the notebooks) build the same dataclass directly. A field's CLI spelling may
differ from its name (`option(flag="latent_size")` for `num_latents`: the seed's flag, one name in the code).
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any


def option(default: Any = MISSING, help: str = "", *, flag: str | None = None, aliases: tuple[str, ...] = (),
           choices: tuple | None = None, const: Any = None, saved: bool = False, resume: bool = False,
           required: bool = False) -> Any:
    """A config field. saved: recorded in the run's lcot.json; resume: must match to resume a checkpoint.

    A list field takes one or more values (`--ks 1 2 4`), or repeats (`--image a --image b`) when its default
    is an empty list. required: a flag the command needs although the dataclass has a default (a subclass's
    fields must all have one).
    """
    meta = {"help": help, "flag": flag, "aliases": aliases, "choices": choices, "const": const, "saved": saved,
            "resume": resume, "required": required}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag(f: Field) -> str:
    return "--" + (f.metadata.get("flag") or f.name)


def _base_type(hint: Any) -> type:
    """int for `int`, `int | None` and `Optional[int]`; list[int] for `list[int] | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def parser(cls: type, prog: str, description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta, kind = f.metadata, _base_type(hints[f.name])
        required = f.metadata.get("required") or f.default is MISSING and f.default_factory is MISSING
        kw: dict[str, Any] = {"dest": f.name, "help": meta.get("help", "")}
        if meta.get("flag") and kind is not bool:
            kw["metavar"] = meta["flag"].upper()
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        if kind is bool:
            kw["action"] = "store_true"
        elif typing.get_origin(kind) is list:
            kw["type"] = typing.get_args(kind)[0]
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
            if default == []:
                kw["action"] = "append"
            else:
                kw["nargs"] = "+"
        else:
            kw["type"] = kind
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
            if meta.get("const") is not None:
                kw.update(nargs="?", const=meta["const"])
        if required:
            kw["required"] = True
        else:
            kw["default"] = default
            shown = " ".join(map(str, default)) or "none" if isinstance(default, list) else default
            shown = '""' if shown == "" else shown
            kw["help"] += f" (default: {shown})".replace("%", "%%")  # argparse formats help with %
        p.add_argument(flag(f), *meta.get("aliases", ()), **kw)
    return p


def parse(cls: type, argv: list[str] | None, prog: str, description: str | None = None):
    ns = parser(cls, prog, description).parse_args(argv)
    return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})


def saved(cfg) -> dict:
    """The fields marked saved=True, by name (what a run records about itself)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.metadata.get("saved")}


def resume_keys(cls: type) -> list[Field]:
    return [f for f in fields(cls) if f.metadata.get("resume")]


FAST_CHOICES = ("auto", "off", "static", "graph")  # lcot.fast.runner.FAST_MODES (a leaf may not import it)
COMPILE_CHOICES = ("auto", "on", "off")


@dataclass
class SpeedConfig:
    """How the latent passes run: the flags training, the teacher precompute, generation and evaluation share.
    Plain metadata (help, choices), so that transformers' HfArgumentParser reads the fields too."""

    fast: str = field(default="auto", metadata={"choices": FAST_CHOICES, "help": (
        "how the latent passes run. auto: lcot.fast's runner, which on a GPU runs the latent chain without "
        "gradients on a static KV cache replayed as CUDA graphs, and everywhere uses lcot's packed vision "
        "attention and grouped step attention; off: the method alone (transformers' modules, a dynamic cache; "
        "lcot.fast is not loaded; --latent_grad adjoint is computed as full); static, graph: the static cache "
        "with eager steps, or with CUDA graphs where there is a GPU")})
    compile_step: str = field(default="auto", metadata={"choices": COMPILE_CHOICES, "help": (
        "torch.compile the one-token latent step (and decoding steps) inside its CUDA graph. auto: where the steps "
        "run as CUDA graphs (a GPU); on: also on a static cache without graphs (--fast static); off: the eager "
        "step. Compiled steps round like fused kernels (a few fp32 ulps a step). torch compiles at the first batch "
        "and again at the first new sequence length, about a minute each at 3B or 7B; under it --latent_grad "
        "adjoint's pass over the slots is compiled too. A compile that fails is dropped with a warning")})
