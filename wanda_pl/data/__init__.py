"""Lightning datamodules and what they read: text sources cut into calibration and evaluation
windows, and image folders. Embedded assets they may name are fetched by :mod:`wanda_pl.assets`."""
