"""Training recipe for emo-edge's own tiny EMO model and its standard-MoE twin (`python -m emo_edge.train`).

- `data.py`: corpus (generated domains + machine sources read at training time), tokenization, packing.
- `model.py`: the PyTorch decoder with EMO document-pool routing and standard top-k routing.
- `loop.py`: data preparation, training loop, evaluation, export in the upstream HF layout.
- `card.py`: model card and loss curve.
"""
