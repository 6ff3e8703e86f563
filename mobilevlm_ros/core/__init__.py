"""The MobileVLM inference core. Imports no ROS.

Module map (one place per concern):
  config       checkpoint config.json -> typed configs (LLM, vision tower, projector)
  checkpoint   weight files (.bin / .safetensors, single or sharded) and vision-weight resolution
  tokenizer    SentencePiece tokenizer with the reference (slow LlamaTokenizer) semantics
  prompt       the "v1" conversation prompt and its token ids around the image slot
  preprocess   camera frame (numpy, any size, RGB/BGR) -> normalised 336x336 pixels
  clip         CLIP ViT vision transformer (torch reference)
  projectors/  one file per projector type (ldp, ldpv2, mlp)
  llama        LLaMA decoder (torch reference)
  vision       vision backends behind one interface (torch, onnxruntime, tensorrt)
  generation   generation parameters, results, sampling and stop rules
  decoders/    language decoders behind one interface (torch, llamacpp)
  pipeline     MobileVLM: encode a frame once, answer many questions about it
"""
