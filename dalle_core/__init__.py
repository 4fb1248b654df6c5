"""The models and their maths in pure PyTorch: tokenizer, dVAE, DALLE transformer, CLIP, checkpoints, configs.

Nothing here imports Ray, so every piece can be used and tested on its own. Submodules are not imported
eagerly: ``import dalle_core`` stays cheap.
"""
