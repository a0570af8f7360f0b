"""`corral vocab extend`: teach a tokenizer a new language (Chinese-LLaMA-Alpaca's recipe).

- `corpus.py`: reads the corpus files (UTF-8 text or JSON/JSONL records), with one error each
  for a missing, empty or non-UTF-8 file.
- `spm.py`: SentencePiece tokenizers (LLaMA 1/2): a SentencePiece model trained on the corpus
  has its new pieces appended to the old model (old pieces, ids and scores unchanged).
- `bpe.py`: byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen): new merges learned with the
  `tokenizers` library over the old tokens, appended after the old merges.
- `extend.py`: both, then the model's embedding and LM head rows resized, each new row the mean
  of the old rows of the tokens it replaces; writes a model folder that trains, chats, serves
  and exports like any other.
"""
