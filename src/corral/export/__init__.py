"""Shipping a model: `corral export` (merged Hugging Face folder, GGUF for llama.cpp) and
`corral convert meta` (Meta's original checkpoints into a Hugging Face folder).

    merge.py        load base + adapters, merge, check merged logits equal unmerged ones
    hf_folder.py    write the merged model as a Hugging Face folder (+ model_card.py)
    gguf_file.py    write a GGUF file for llama.cpp (tensors; gguf_vocab.py: the tokenizer)
    meta.py         Meta checkpoints -> Hugging Face folder
    outputs.py      atomic outputs: nothing half-written is ever left behind
"""
