"""Everything between raw slides and tensors (paper III and IV-A).

- :mod:`repro.data.slides`: multi-resolution slide reading with pyvips (levels, mpp, regions).
- :mod:`repro.data.synthetic`: a synthetic biopsy set in PANDA's layout, for runs without downloads.
- :mod:`repro.data.tissue`: the tissue mask used to trim whitespace.
- :mod:`repro.data.prepare`: labels from PANDA's ``train.csv`` (binary, primary Gleason pattern);
  0.96 um/px, trim, pad/crop, prepared TIFFs and ``manifest.csv``.
- :mod:`repro.data.splits`: train/tune/test split and the nested Table I subsets.
- :mod:`repro.data.datasets`: the whole-biopsy torch dataset, region and mask readers.
- :mod:`repro.data.sampling`: the negative-oversampling sampler (shared by streaming and MIL).
- :mod:`repro.data.stats`: per-channel mean/std of the training images.
- :mod:`repro.reporting.gallery`: thumbnails with their tissue masks (notebook 01).

Submodules are imported explicitly (``from repro.data.prepare import prepare_dataset``) so that
reading slides does not pull in torch.
"""
