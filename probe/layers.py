"""Find the decoder layer stack of a causal LM and describe it.

A *layer* is an index into the resolved decoder `nn.ModuleList`, 0-based. The
resolver returns that list, its dotted path and the final norm, so probing,
LoRA targeting and analysis all count layers the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Dotted paths of the decoder stack and of the final norm, tried in order. The
# first entry whose module exists wins; PEFT wrappers are unwrapped first.
KNOWN_LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Qwen2, Mistral, Gemma, Gemma3 text-only
    "model.language_model.layers",  # Gemma3 / Llava-style multimodal wrappers
    "language_model.model.layers",
    "transformer.h",  # GPT-2, GPT-J, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.layers",
    "backbone.layers",
)
KNOWN_NORM_PATHS: tuple[str, ...] = (
    "model.norm",
    "model.language_model.norm",
    "language_model.model.norm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
    "model.decoder.final_layer_norm",
    "transformer.norm",
    "backbone.norm_f",
)


@dataclass(frozen=True)
class LayerStack:
    """The decoder layers of a model.

    Attributes:
        path: Dotted path of the layer `nn.ModuleList` inside the base model,
            e.g. "model.layers". PEFT wrapper prefixes are not included.
        layers: The `nn.ModuleList` itself.
        norm_path: Dotted path of the final norm, or None when none was found.
        norm: The final norm module, or None.
    """

    path: str
    layers: nn.ModuleList
    norm_path: str | None
    norm: nn.Module | None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layers_pattern(self) -> str:
        """The last component of `path`, which PEFT's `layers_pattern` expects ("layers", "h")."""
        return self.path.rsplit(".", 1)[-1]


def unwrap_peft(model: nn.Module) -> nn.Module:
    """Return the underlying transformers model of a PEFT `PeftModel`, or `model` itself."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        return get_base()
    return model


def get_submodule_or_none(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def resolve_layers(model: nn.Module, layers_path: str | None = None) -> LayerStack:
    """Find the decoder layer list of `model`.

    Args:
        model: A transformers causal LM, optionally wrapped by PEFT.
        layers_path: Dotted path that overrides the lookup, e.g. "model.layers".

    Returns:
        The layer stack with its path and the final norm.

    Raises:
        ValueError: If `layers_path` does not name an `nn.ModuleList`, or no
            decoder stack can be found.
    """
    base = unwrap_peft(model)

    if layers_path is not None:
        module = get_submodule_or_none(base, layers_path)
        if not isinstance(module, nn.ModuleList):
            found = type(module).__name__ if module is not None else "nothing"
            raise ValueError(
                f"`--layers-path {layers_path}` must name an nn.ModuleList of decoder layers in "
                f"{type(base).__name__}, found {found}; candidates: {', '.join(list_module_lists(base)) or 'none'}"
            )
        return LayerStack(layers_path, module, *find_final_norm(base, layers_path))

    for path in KNOWN_LAYER_PATHS:
        module = get_submodule_or_none(base, path)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return LayerStack(path, module, *find_final_norm(base, path))

    path = guess_layers_path(base)
    if path is not None:
        return LayerStack(path, base.get_submodule(path), *find_final_norm(base, path))

    raise ValueError(
        f"cannot find the decoder layers of {type(base).__name__}: no known path "
        f"({', '.join(KNOWN_LAYER_PATHS)}) exists and no ModuleList of repeated blocks was found. "
        f"Pass the dotted path with --layers-path (Python: layers_path=...); "
        f"ModuleLists in this model: {', '.join(list_module_lists(base)) or 'none'}"
    )


def list_module_lists(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and name]


def guess_layers_path(model: nn.Module) -> str | None:
    """Pick the longest `nn.ModuleList` whose entries all share one class, or None."""
    best_path, best_len = None, 1
    for name in list_module_lists(model):
        module = model.get_submodule(name)
        classes = {type(child) for child in module}
        if len(classes) == 1 and len(module) > best_len:
            best_path, best_len = name, len(module)
    return best_path


def find_final_norm(model: nn.Module, layers_path: str) -> tuple[str | None, nn.Module | None]:
    for path in KNOWN_NORM_PATHS:
        module = get_submodule_or_none(model, path)
        if module is not None:
            return path, module

    # Fall back to a sibling of the layer list whose name contains "norm" or "ln".
    parent_path = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    parent = model.get_submodule(parent_path) if parent_path else model
    for name, module in parent.named_children():
        if "norm" in name.lower() or name.lower().startswith("ln"):
            return f"{parent_path}.{name}" if parent_path else name, module
    return None, None


def layer_map(stack: LayerStack) -> list[tuple[int, str, int]]:
    """List (index, dotted module path, parameter count) for every decoder layer."""
    return [
        (index, f"{stack.path}.{index}", sum(p.numel() for p in layer.parameters()))
        for index, layer in enumerate(stack.layers)
    ]
