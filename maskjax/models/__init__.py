"""The model families. Each module holds one family's config dataclass and Flax NNX model.

  bert.py  BERT and RoBERTa (post-LN encoder, MLM head at gathered positions, NSP)
  gpt.py   GPT-2 (pre-LN causal decoder, tied output)
  vit.py   ViT and MAE (encoder on visible patches only, narrow decoder)
  beit.py  BEiT (relative position bias, layer scale, [MASK] patch) and its VQ tokenizer
"""
