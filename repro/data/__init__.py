"""Everything between raw slides and tensors (paper III and IV-A).

- :mod:`repro.data.slides`: open a slide (:func:`~repro.data.slides.open_slide`), one
  :class:`~repro.data.slide_base.Slide` interface over :mod:`~repro.data.pyvips_backend` (PANDA
  and generic TIFFs) and :mod:`~repro.data.openslide_backend` (vendor formats); :mod:`tiff`
  reads TIFF directories and joins pages.
- :mod:`repro.data.synthetic`: a synthetic biopsy set in PANDA's layout, for runs without downloads.
- :mod:`repro.data.sources`: the slide-level labels of a dataset defined by a CSV.
- :mod:`repro.data.tissue`: the tissue mask used to trim whitespace.
- :mod:`repro.data.prepare`: labels (PANDA's ``train.csv`` or a CSV), 0.96 um/px, trim,
  pad/crop, prepared TIFFs and the manifest.
- :mod:`repro.data.splits`: train/tune/test split (per patient when known) and the nested
  Table I subsets.
- :mod:`repro.data.store`: reading prepared images, regions and tissue masks.
- :mod:`repro.data.augment`: the pyvips augmentation and its per-image generator.
- :mod:`repro.data.datasets`: the whole-biopsy torch dataset (streaming).
- :mod:`repro.data.patches`: the MIL patch grid and patch reading.
- :mod:`repro.data.sampling`: the negative-oversampling sampler (shared by streaming and MIL).
- :mod:`repro.data.stats`: per-channel mean/std of the training images.

Submodules are imported explicitly (``from repro.data.prepare import prepare_dataset``) so that
reading slides does not pull in torch.
"""
