"""Data: the synthetic nuScenes/Occ3D generator, the data validator and the Occ3D metric.

- ``python -m bevkit.data.synthetic --out DIR`` (bevkit.data.synthetic.generate)
- ``python -m bevkit.data.validate --model {fbocc,bevdepth} DIR`` (bevkit.data.validate.validate)
- bevkit.data.occ_metrics: Occ3D mIoU (camera-mask evaluation as in FB-OCC)

Importing this package is cheap (no torch, no devkit).
"""
