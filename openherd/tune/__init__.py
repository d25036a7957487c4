"""Customise a model: LoRA fine-tuning, synthetic data, open export (see docs/tune.md).

    config.py   LoRAConfig, TuneConfig: the settings, without torch (the CLI and web app read them)
    lora.py     LoRALinear, apply_lora, mark_only_lora_as_trainable, merge_lora_weights
    data.py     chat / prompt-completion JSONL -> token rows with assistant-only targets
    sft.py      `herd tune`: setup -> fit -> validate -> finish (adapter GGUF + store manifest)
    kernels.py  the model step: LoRA-aware forward/backward as fused autograd functions
    checkpoint.py  checkpoints, resume checks, history.json and loss.png, the run-dir lock
    export.py   llama.cpp adapter GGUF, merged GGUF, merged safetensors, PEFT
    distill.py  `herd distill`: answers from an OpenAI-compatible endpoint or a local model

The submodules import torch (all but config.py and distill.py); this package itself imports nothing,
so `herd --help` never pays for it.
"""
