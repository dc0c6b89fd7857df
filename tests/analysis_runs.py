"""Build real run directories for the analysis tests, the way `align` lays them out.

The adapters are real PEFT adapters on the tiny random models: `get_peft_model`
with `layers_to_transform`, LoRA B set to known values, then
`save_pretrained`. Only the DPO training itself is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, get_peft_model

from probe.models import load_model
from probe.partition import Partition

TARGETS = {"tiny-llama": ["q_proj", "v_proj", "down_proj"], "tiny-gpt2": ["c_attn", "c_fc"]}


def make_run(
    root: Path,
    name: str,
    *,
    model: str = "tiny-llama",
    layers: list[int] | None = None,
    strategy: str = "local",
    blocks: list[str] | None = None,
    rank: int = 4,
    alpha: float = 8.0,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    set_b: Callable[[str, torch.Tensor], None] | None = None,
    seed: int = 0,
    capability: str | None = "syntax",
) -> Path:
    """Write `root/name` with config.json and a PEFT adapter on the given layers.

    Args:
        set_b: Called with (module name, LoRA B weight) for each adapted module,
            under `torch.no_grad`; it may fill the weight in place. Default:
            B = 0.01 everywhere, so the update is non-zero.
    """
    loaded = load_model(model)
    partition = Partition.thirds(loaded.num_layers, {"name": model, "layers_path": loaded.stack.path})
    layers = layers if layers is not None else partition.block("local").layers
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=TARGETS[model], layers_to_transform=layers,
        layers_pattern=loaded.stack.layers_pattern, use_rslora=use_rslora,
        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
    )
    torch.manual_seed(seed)  # LoRA A is initialised from the global generator
    peft_model = get_peft_model(loaded.model, config)
    with torch.no_grad():
        for module_name, module in peft_model.named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                weight = module.lora_B["default"].weight
                if set_b is None:
                    weight.fill_(0.01)
                else:
                    set_b(module_name, weight)

    run_dir = root / name
    peft_model.save_pretrained(run_dir / "adapter")
    blocks = blocks if blocks is not None else [block.name for block in partition.blocks if set(block.layers) & set(layers)]
    record = {
        "config": {"model": model, "strategy": strategy, "seed": seed, "max_steps": 0, "lora_r": rank,
                   "lora_alpha": alpha, "beta": 0.1},
        "partition": partition.to_dict(),
        "strategy": strategy,
        "blocks": blocks,
        "adapted_layers": layers,
        "model": {"name": model, "source": model, "checkpoint": None, "num_layers": loaded.num_layers,
                  "layers_path": loaded.stack.path},
        "adapters": [{"name": "default", "path": "adapter", "blocks": blocks, "layers": layers, "capability": capability}],
        "versions": {},
    }
    (run_dir / "config.json").write_text(json.dumps(record, indent=2))
    return run_dir
