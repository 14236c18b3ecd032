"""Interoperability with the Hugging Face model format and mlx-lm, and dense-to-MoE upcycling.

Modules, lowest first:
  hf_config    which Hugging Face architecture matches a tinymoe config: routing semantics,
               MoE layer placement, shared experts, config.json fields; refusals with reasons
  hf_config_read  a config.json back to a tinymoe ModelConfig
  hf_weights   tensor names and layouts: tinymoe <-> Hugging Face, reading HF safetensors
  hub          a local directory, or a hub repository id downloaded with huggingface_hub
  import_hf    a Hugging Face directory -> (ModelConfig, weights, tokenizer) -> checkpoint
  export       a tinymoe checkpoint -> a Hugging Face directory (config, safetensors, tokenizer)
  upcycle      a dense model -> an MoE (copied experts, Drop-Upcycling, fresh routers)
  init_state   a new training run from a checkpoint's weights (train --init)

Tokenizer files (tokenizer.json both ways) live in tinymoe.tokenizers.hf. Nothing here imports
MLX, transformers or huggingface_hub at module level.
"""
